#!/usr/bin/env python
"""Weight-transfer fidelity study (feature level): copy vs stats vs calibrate.

    tools/transfer_study.py --output docs/images/transfer_fidelity.png      # ~2 min on 2 cores
    tools/transfer_study.py --smoke                                           # seconds (tests)

Prints a markdown table (cosine of each ResNet-18 stage's output to the BN teacher's, on
held-out images) and writes a PNG plot of the final-stage cosine per method and regime.
"""

import argparse
import os
import sys
import tempfile

from gn_det.studies import STAGES, transfer_fidelity


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r.regime for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    width = 0.8 / len(regimes)
    for i, regime in enumerate(regimes):
        values = [next(r.cosines["layer4"] for r in rows if r.regime == regime and r.method == m) for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], values, width, label=regime)
    ax.set_xticks([j + width * (len(regimes) - 1) / 2 for j in range(len(methods))])
    ax.set_xticklabels(methods, rotation=20, ha="right")
    ax.set_ylabel("cosine to BN teacher (layer4)")
    ax.set_ylim(0, 1)
    ax.set_title("BN -> GN weight transfer, ResNet-18, held-out images")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="PNG plot to write")
    parser.add_argument("--force", action="store_true", help="overwrite --output")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    if args.output and os.path.exists(args.output) and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite")
    kwargs = dict(size=32, population=16, held_out=4, calibration_counts=(2, 4)) if args.smoke else {}
    rows = transfer_fidelity(**kwargs)
    print("| regime | method | " + " | ".join(STAGES) + " | seconds |")
    print("|---|---|" + "---|" * len(STAGES) + "---|")
    for r in rows:
        print(f"| {r.regime} | {r.method} | " + " | ".join(f"{r.cosines[s]:.3f}" for s in STAGES)
              + f" | {r.seconds:.1f} |")
    if args.output:
        _plot(rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
