#!/usr/bin/env python
"""Print a run's final box AP and mask AP from detectron2's metrics.json.

lab/tools/print_results.py output/demo
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gn_det_lab.curves import read_metrics  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        run = read_metrics(args.output_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "bbox/AP" not in run.series:
        print(
            f"error: {args.output_dir}: no evaluation results (did the run finish?)",
            file=sys.stderr,
        )
        return 2

    def last(key):
        iterations, values = run.series.get(key, ([], []))
        return f"{values[-1]:.1f}" if values else "n/a"

    iteration = run.series["bbox/AP"][0][-1]
    print(
        f"{args.output_dir}: iteration {iteration}: "
        f"box AP {last('bbox/AP')} (AP50 {last('bbox/AP50')}), "
        f"mask AP {last('segm/AP')} (AP50 {last('segm/AP50')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
