#!/usr/bin/env python
"""A folded model fine-tuned with labels: how much of its GN model's AP it gets back.

    lab/tools/fold_finetune.py --gn-run output/foldft/gn --output-dir output/foldft \\
        --iterations 1500 --checkpoint-period 300 --lr 1e-4 \\
        --json lab/results/folding_finetuned.json
    lab/tools/fold_finetune.py ... --smoke                                  # seconds (tests)

1. ``gn-det convert --to folded`` of the GN run's final weights, as a user runs it (statistics
   over 32 training images, 100 distillation steps: the command's defaults), timed;
2. ``gn-det train`` of the folded architecture (``MODEL.NORM_CONVERSION.FOLDED True``) from
   that checkpoint, with the labels of the GN run's own training set and its recipe, at
   ``--lr`` for ``--iterations`` (LR x0.1 at 80 %), a checkpoint every ``--checkpoint-period``;
3. the GN model, the folded one and every fine-tuning checkpoint evaluated on ``--dataset``
   with 200-resample bootstrap intervals over images (``gn_det_lab.backbone``): AP, and the
   share of the GN model's AP kept with a **paired** interval (the ratio on each resample of
   the same images).

Everything is cached in ``--output-dir``: a stopped run goes on where it was.
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("box", "mask")


def convert(args) -> float:
    """The folded checkpoint (``output-dir/folded.pth``); returns the conversion's seconds."""
    from gn_det_lab.runs import SMOKE_OPTS

    folded = Path(args.output_dir) / "folded.pth"
    timing = Path(args.output_dir) / "folded_seconds.json"
    if folded.is_file() and timing.is_file():
        return json.loads(timing.read_text())["seconds"]
    command = [
        sys.executable,
        "-m",
        "gn_det.cli",
        "convert",
        "--to",
        "folded",
        "--config",
        str(Path(args.gn_run) / "config.yaml"),
        "--weights",
        str(Path(args.gn_run) / "model_final.pth"),
        "--output",
        str(folded),
        "--force",
    ]
    if args.smoke:
        command += ["--calib-images", "2", "--calib-distill-steps", "1", *SMOKE_OPTS[4:8]]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return seconds


def finetune(args, *, control: bool = False) -> dict:
    """Fine-tune the folded model (``output-dir/finetuned``), or with ``control`` the GN model
    itself on the same schedule (``output-dir/gn_finetuned``): the GN run was still improving
    when it stopped, so more training alone raises AP too."""
    from gn_det_lab.runs import SMOKE_OPTS, train_run

    iterations = 2 if args.smoke else args.iterations
    period = 1 if args.smoke else args.checkpoint_period
    start = (
        ["MODEL.WEIGHTS", str(Path(args.gn_run) / "model_final.pth")]
        if control
        else ["MODEL.NORM_CONVERSION.FOLDED", "True",
              "MODEL.WEIGHTS", str(Path(args.output_dir) / "folded.pth")]
    )  # fmt: skip
    opts = [
        *start,
        "SOLVER.BASE_LR", repr(args.lr),
        "SOLVER.MAX_ITER", str(iterations),
        "SOLVER.STEPS", f"({max(1, min(iterations - 1, round(iterations * 0.8)))},)",
        "SOLVER.WARMUP_ITERS", str(min(50, iterations // 10)),
        "SOLVER.CHECKPOINT_PERIOD", str(period),
        "TEST.EVAL_PERIOD", str(iterations),
        *(SMOKE_OPTS if args.smoke else []),
    ]  # fmt: skip
    return train_run(
        str(Path(args.gn_run) / "config.yaml"),
        opts,
        Path(args.output_dir) / ("gn_finetuned" if control else "finetuned"),
        datasets=[args.val_dataset],
        keep_checkpoints=True,
    )


def _evaluated(cache: Path, key: str, load, dataset: str, resamples: int) -> dict:
    from gn_det_lab.backbone import evaluate_intervals

    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in done:
        cfg, model = load()
        done[key] = evaluate_intervals(cfg, model, dataset, resamples)
        cache.write_text(json.dumps(done))
    return done[key]


def evaluate(args) -> list:
    """[(label, fine-tuning iterations or None, {"box", "mask"})] on ``--dataset``: the GN
    model, the folded one, each fine-tuning checkpoint."""
    from gn_det_lab.bn_statistics import load_run

    out = Path(args.output_dir)
    run = out / "finetuned"
    cache = out / f"intervals_{args.dataset}.json"
    resamples = 20 if args.smoke else args.resamples
    models = [
        ("GN (as trained)", None, lambda: load_run(args.gn_run)),
        ("folded: statistics + 100 distillation steps", 0,
         lambda: load_run(run, str((out / "folded.pth").resolve()))),
    ]  # fmt: skip
    checkpoints = sorted(run.glob("model_[0-9]*.pth"))
    for path in checkpoints:
        iteration = int(path.stem[6:]) + 1
        models.append(("folded, fine-tuned with labels", iteration,
                       lambda p=path: load_run(run, p.name)))  # fmt: skip
    control = out / "gn_finetuned" / "model_final.pth"
    if control.is_file():
        iteration = 2 if args.smoke else args.iterations
        models.append(("GN, fine-tuned with labels (control)", iteration,
                       lambda: load_run(out / "gn_finetuned")))  # fmt: skip
    rows = []
    for label, iteration, load in models:
        key = f"{label} {iteration}"
        rows.append((label, iteration, _evaluated(cache, key, load, args.dataset, resamples)))
    return rows


def kept(model: dict, reference: dict, kind: str) -> dict:
    """The share of ``reference``'s AP that ``model`` keeps, with the percentile interval of
    the ratio over the paired resamples (the same images for both)."""
    import numpy as np

    a = np.asarray(model[kind]["samples"], dtype=float)
    b = np.asarray(reference[kind]["samples"], dtype=float)
    ratios = a / np.where(b > 0, b, np.nan)
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    share = model[kind]["ap"] / reference[kind]["ap"] if reference[kind]["ap"] else float("nan")
    return {"kept": share, "low": float(low), "high": float(high)}


COLUMNS = [
    "model",
    "fine-tuning iterations (2 images each)",
    "box AP [95 %]",
    "mask AP [95 %]",
    "box AP kept [95 %, paired]",
    "mask AP kept [95 %, paired]",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gn-run", required=True, help="a finished GN run (config.yaml, weights)")
    parser.add_argument("--output-dir", default="output/foldft")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--checkpoint-period", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dataset", default="shapes_large_test")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--val-dataset", default="shapes_val", help="evaluated after fine-tuning")
    parser.add_argument("--json", help="the results file to write")
    parser.add_argument("--force", action="store_true", help="replace --json")
    parser.add_argument(
        "--control", action="store_true", help="also fine-tune the GN model on the same schedule"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny everything (tests)")
    args = parser.parse_args(argv)
    if args.json and Path(args.json).exists() and not args.force:
        print(f"{args.json} exists: pass --force to replace it", file=sys.stderr)
        return 2
    import gn_det.data  # noqa: F401  (registers the shapes datasets)

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    convert_seconds = convert(args)
    record = finetune(args)
    control = finetune(args, control=True) if args.control else None
    for run in filter(None, (record, control)):
        if run.get("returncode") != 0:
            print(f"fine-tuning failed: {run.get('failure')}", file=sys.stderr)
            return 1
    rows = evaluate(args)
    reference = rows[0][2]
    table, data = [], []
    for label, iteration, result in rows:
        shares = {k: kept(result, reference, k) for k in KINDS}
        table.append(
            [
                label,
                "—" if iteration is None else f"{iteration:,}",
                *(f"{result[k]['ap']:.1f} [{result[k]['low']:.1f}, {result[k]['high']:.1f}]"
                  for k in KINDS),
                *("—" if iteration is None else
                  f"{100 * s['kept']:.1f} % [{100 * s['low']:.1f}, {100 * s['high']:.1f}]"
                  for s in shares.values()),
            ]
        )  # fmt: skip
        data.append({"model": label, "iterations": iteration, **result, "kept": shares})
    if control:  # the folded model's last checkpoint against the GN model trained as long
        folded_last = next(r for r in reversed(rows) if r[0].startswith("folded, fine-tuned"))
        shares = {k: kept(folded_last[2], rows[-1][2], k) for k in KINDS}
        table.append(
            ["folded and fine-tuned / GN fine-tuned the same", f"{folded_last[1]:,}", "", "",
             *(f"{100 * s['kept']:.1f} % [{100 * s['low']:.1f}, {100 * s['high']:.1f}]"
               for s in shares.values())]
        )  # fmt: skip
        data.append({"model": "folded fine-tuned vs GN fine-tuned", "kept": shares})
    from gn_det_lab.results import markdown_table, write_results

    print(markdown_table(COLUMNS, table))
    if args.json:
        minutes = {
            "convert": convert_seconds / 60,
            "finetune": record["seconds"] / 60,
            **({"control": control["seconds"] / 60} if control else {}),
        }
        write_results(
            args.json,
            title="The fully folded demo model fine-tuned with labels: AP kept of its GN model's",
            command=" ".join(["lab/tools/fold_finetune.py", *(argv or sys.argv[1:])]),
            machine=f"{os.cpu_count()} CPU cores; CPU minutes: conversion "
            f"{minutes['convert']:.1f}, fine-tuning {minutes['finetune']:.1f} (wall, "
            "2 threads)",
            columns=COLUMNS,
            rows=table,
            data={"minutes": minutes, "models": data, "fine_tuning": record, "control": control},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
