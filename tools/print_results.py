#!/usr/bin/env python
"""Print a run's final box AP and mask AP from detectron2's metrics.json.

    tools/print_results.py output/demo
"""

import argparse
import json
import math
import sys
from pathlib import Path


def final_results(output_dir: Path) -> dict:
    """The last record of metrics.json that holds evaluation results (bbox/AP, segm/AP)."""
    records = []
    for line in (output_dir / "metrics.json").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
    evaluations = [r for r in records if "bbox/AP" in r]
    if not evaluations:
        raise SystemExit(f"{output_dir}/metrics.json: no evaluation results (did the run finish?)")
    return evaluations[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    results = final_results(args.output_dir)

    def fmt(key):
        value = results.get(key, float("nan"))
        return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"

    print(f"{args.output_dir}: iteration {results.get('iteration')}: "
          f"box AP {fmt('bbox/AP')} (AP50 {fmt('bbox/AP50')}), "
          f"mask AP {fmt('segm/AP')} (AP50 {fmt('segm/AP50')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
