#!/usr/bin/env python
"""Evaluate finished BN runs with running, precise and per-image batch statistics.

Why does BN at 1 image per batch fall (``lab/tools/small_batch_study.py``)? Each finished run is
evaluated three ways (``gn_det_lab.bn_statistics``): with its running averages, as trained;
with precise (population) statistics recomputed over ``--precise-images`` training images at
the run's batch size; and with each test image's own statistics, which is what a run at 1 image
per batch normalised with in training. If ``precise`` recovers the AP, the moving average's noise
was the cause; if only ``batch`` does, the gap between training's per-image statistics and any
population statistics was; if neither does, the weights themselves are worse.

    lab/tools/bn_statistics_study.py output/small_batch/bn_b1_lr0.0005_sqrt_s1 \
        output/small_batch/bn_b8_lr0.0005_sqrt_s1 --json output/bn_statistics.json
"""

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import sys
import time
from pathlib import Path

from gn_det.checkpoint.io import write_text_atomically
from gn_det_lab.bn_statistics import MODES, evaluate_bn_modes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="finished run folders (config.yaml, model_final.pth)"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="evaluate on these (default: each run's DATASETS.TEST)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--precise-images",
        type=int,
        default=200,
        help="training images for the precise statistics (default 200, detectron2's "
        "TEST.PRECISE_BN.NUM_ITER at 1 image per batch)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--force", action="store_true", help="overwrite --json")
    args = parser.parse_args(argv)
    if args.precise_images < 1:
        parser.error("--precise-images must be positive")
    if args.json and Path(args.json).exists() and not args.force:
        parser.error(f"{args.json} exists; pass --force to overwrite")
    for run in args.runs:
        if not (Path(run) / "model_final.pth").is_file():
            parser.error(f"{run}: not a finished run (no model_final.pth)")

    results = {}
    for run in args.runs:
        start = time.perf_counter()
        found = evaluate_bn_modes(
            run, datasets=args.datasets or (), precise_images=args.precise_images, modes=args.modes
        )
        results[run] = {"modes": found, "seconds": time.perf_counter() - start}
    datasets = list(
        dict.fromkeys(d for r in results.values() for m in r["modes"].values() for d in m)
    )
    print("| run | statistics | " + " | ".join(f"box / mask AP {d}" for d in datasets) + " |")
    print("|---|---|" + "---|" * len(datasets))
    for run, result in results.items():
        for mode, found in result["modes"].items():
            cells = [
                " / ".join(f"{ap:.1f}" for ap in found[d]) if d in found else "–" for d in datasets
            ]
            print(f"| {Path(run).name} | {mode} | " + " | ".join(cells) + " |")
    if args.json:
        write_text_atomically(args.json, json.dumps(results, indent=1))
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
