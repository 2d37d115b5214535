#!/usr/bin/env python
"""The small-batch study: box and mask AP against images per batch for BN, GN and no norm.

    lab/tools/small_batch_study.py --output-dir output/small_batch --plot lab/images/small_batch.png
    lab/tools/small_batch_study.py --batches 2 --base-lrs 0.00025 0.0005 0.001   # an LR sweep
    lab/tools/small_batch_study.py --smoke --output-dir /tmp/sb     # seconds per cell (tests)

The GN paper's Figure 1 on the shapes dataset: the shapes Mask R-CNN (R-18-FPN, from scratch)
trained with each norm config (``shapes/bn.yaml``; ``shapes/syncbn.yaml``, run as ``--processes``
gloo processes whose BN statistics are all-reduced; ``shapes/gn.yaml``; ``shapes/frozenbn.yaml``,
"no norm": FrozenBN at the identity) at 1, 2, 4 and 8 images per batch (per process). Every
run sees the same number of images (``--images``, by default the configs' own: 1,800 steps of 2
images); the learning rate is the config's rate at its 2 images per batch, or each of
``--base-lrs``, scaled with the batch linearly (SGD's rule) or by its square root
(``--lr-scaling sqrt``, Adam's rule: the configs train with AdamW); warmup and LR drop are fixed
in images, at the configs' fractions. The study in lab/benchmarks.md (each cell to the plateau
of BN at 8 images per batch: 14,400 images):

    lab/tools/small_batch_study.py --output-dir output/small_batch --images 14400 \
        --eval-period 1800 --lr-scaling sqrt --norms bn gn --batches 8 1 2 4 --seeds 1 2 --jobs 2

Each cell is one ``gn-det train`` process (its own OUTPUT_DIR, metrics.json and COCO
evaluations, ``gn_det_lab.runs``), evaluated on ``shapes_val`` (every ``--eval-period`` images
and at the end) and, at the end, on the held-out ``shapes_test``; a cell that already finished
is read, not rerun, and one that was stopped resumes from its last checkpoint (one per
evaluation), so a grid can run across sessions.
``--jobs 2`` runs two cells at a time, one thread each.

Prints a markdown table (per norm, batch and LR: box and mask AP on both splits, mean and
spread over ``--seeds``) and writes the PNG (AP against images per batch, one line per norm at
its best LR on ``shapes_val``) and ``results.json`` in ``--output-dir``.
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import concurrent.futures
import json
import math
import statistics
import sys
from pathlib import Path

NORMS = {"bn": "BN", "syncbn": "SyncBN", "gn": "GN", "gn_ws": "GN+WS",
         "frozenbn": "no norm (FrozenBN)"}
SPLITS = ("shapes_val", "shapes_test")  # choose on the first, report the second too
#: ``--data shapes_hr``: the high-resolution split (1200x1600 images, 40 to train on), resized
#: to ``--hr-size`` pixels on the short side; its cells are named ``hr{size}_...``.
HR_SPLITS = ("shapes_hr_val", "shapes_hr_test")


def config_schedule(norm: str) -> dict:
    """The config's own schedule: batch, LR, and warmup, LR drop and length in images."""
    from gn_det.cli.config_files import load_config, resolve_config_name

    solver = load_config(resolve_config_name(f"shapes/{norm}.yaml")).SOLVER
    batch = solver.IMS_PER_BATCH
    return {
        "batch": batch,
        "base_lr": solver.BASE_LR,
        "images": solver.MAX_ITER * batch,
        "warmup_images": solver.WARMUP_ITERS * batch,
        "step_fractions": [step / solver.MAX_ITER for step in solver.STEPS],
    }


def schedule(
    config: dict, base_lr: float, batch: int, images: int, scaling: str = "linear"
) -> list:
    """detectron2 overrides for ``batch`` images per batch and ``images`` images seen, with
    ``base_lr`` the rate at the config's batch, scaled with the batch ``linear``-ly (Goyal et al.
    2017, for SGD) or by its square root (``sqrt``: Malladi et al. 2022, for Adam)."""
    iterations = max(1, images // batch)
    steps = [min(round(iterations * f), iterations - 1) for f in config["step_fractions"]]
    steps = [s for s in steps if s >= 1]
    return [
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.BASE_LR",
        repr(scaled_lr(base_lr, batch / config["batch"], scaling)),
        "SOLVER.MAX_ITER",
        str(iterations),
        "SOLVER.WARMUP_ITERS",
        str(max(1, config["warmup_images"] // batch)),
        "SOLVER.STEPS",
        f"({''.join(f'{s},' for s in steps)})",
    ]


def scaled_lr(base_lr: float, ratio: float, scaling: str) -> float:
    """``base_lr`` for a batch ``ratio`` times the config's."""
    return base_lr * (ratio if scaling == "linear" else math.sqrt(ratio))


def run_cell(norm: str, batch: int, base_lr: float, seed: int, args, config: dict) -> dict:
    """Train and evaluate one cell in its own process (or read its finished results)."""
    from gn_det_lab.runs import SMOKE_OPTS, finished_run, threads_per_job, train_run

    # SyncBN: --processes processes of ``batch`` images each, one BN batch of all their images.
    processes = args.processes if norm == "syncbn" else 1
    cell = {"norm": norm, "batch": batch, "processes": processes, "base_lr": base_lr, "seed": seed}
    hr = f"hr{args.hr_size}_" if args.data == "shapes_hr" else ""
    scaling = "" if args.lr_scaling == "linear" else f"_{args.lr_scaling}"
    name = f"{hr}{norm}{processes if processes > 1 else ''}_b{batch}_lr{base_lr:g}{scaling}_s{seed}"
    run_dir = Path(args.output_dir) / name
    cell["run_dir"] = str(run_dir)
    if args.report_only:
        record = finished_run(run_dir)
        return None if record is None else {**cell, **record}
    images = args.images or config["images"]
    step_images = batch * processes
    # A checkpoint at every evaluation (every 1,200 images without): a stopped cell resumes.
    period = max(1, (args.eval_period or 1200) // step_images)
    opts = [
        *schedule(config, base_lr, step_images, images, args.lr_scaling),
        "SEED",
        str(seed),
        "TEST.EVAL_PERIOD",
        str(period if args.eval_period else 0),
        "SOLVER.CHECKPOINT_PERIOD",
        str(period),
        *(SMOKE_OPTS if args.smoke else []),
    ]
    if args.data == "shapes_hr":
        size = 64 if args.smoke else args.hr_size
        opts += [
            "DATASETS.TRAIN",
            "('shapes_hr_train',)",
            "INPUT.MIN_SIZE_TRAIN",
            f"({size},)",
            "INPUT.MAX_SIZE_TRAIN",
            str(size * 4 // 3),
            "INPUT.MIN_SIZE_TEST",
            str(size),
            "INPUT.MAX_SIZE_TEST",
            str(size * 4 // 3),
        ]
    record = train_run(
        f"shapes/{norm}.yaml",
        opts,
        run_dir,
        datasets=args.splits,
        processes=processes,
        threads=max(1, threads_per_job(args.jobs) // processes),
        keep_checkpoints=args.keep_checkpoints,
    )
    return {**cell, **record}


def summarize(cells, splits=SPLITS) -> list:
    """One row per (norm, batch, LR): mean and spread (max - min) of each AP over the seeds."""
    groups = {}
    for c in cells:
        groups.setdefault((c["norm"], c["batch"], c["processes"], c["base_lr"]), []).append(c)
    rows = []
    for (norm, batch, processes, base_lr), runs in sorted(
        groups.items(), key=lambda kv: (list(NORMS).index(kv[0][0]), *kv[0][1:])
    ):
        row = {
            "norm": norm,
            "batch": batch,
            "processes": processes,
            "base_lr": base_lr,
            "seeds": len(runs),
            "minutes": statistics.mean(r["seconds"] for r in runs) / 60,
        }
        for split in splits:
            for key in ("box_ap", "mask_ap"):
                values = [r.get("final", {}).get(split, {}).get(key, math.nan) for r in runs]
                row[f"{split}/{key}"] = (statistics.mean(values), max(values) - min(values))
        rows.append(row)
    return rows


def best_rows(rows, splits=SPLITS) -> list:
    """Per norm, batch and processes, the row of the LR with the best mean box AP on the first
    of ``splits`` (validation)."""
    best = {}
    for row in rows:
        key = (row["norm"], row["batch"], row["processes"])
        score = row[f"{splits[0]}/box_ap"][0]
        current = best[key][f"{splits[0]}/box_ap"][0] if key in best else math.nan
        # A run that diverged (NaN) never displaces one that finished.
        if key not in best or (not math.isnan(score) and (math.isnan(current) or score > current)):
            best[key] = row
    return list(best.values())


#: How ``--bn-statistics`` lines are drawn: (line style, label) per mode of
#: lab/tools/bn_statistics_study.py.
BN_STATISTICS = {
    "precise": (":", "precise statistics at test"),
    "batch": ("--", "each test image's statistics"),
}


def statistics_points(cells, found: dict, split: str) -> dict:
    """``{(norm, processes, mode): [(batch, box AP, mask AP), ...]}`` on ``split``: the seed
    mean of each cell whose run ``found`` (lab/tools/bn_statistics_study.py's JSON) evaluated in
    ``mode`` (its ``running`` mode is the cell's own evaluation, so it is left out)."""
    groups, found = {}, {str(Path(run).resolve()): result for run, result in found.items()}
    for cell in cells:
        for mode, results in (
            found.get(str(Path(cell["run_dir"]).resolve()), {}).get("modes", {}).items()
        ):
            if mode in BN_STATISTICS and split in results:
                key = (cell["norm"], cell["processes"], mode)
                groups.setdefault(key, {}).setdefault(cell["batch"], []).append(results[split])
    return {
        key: [
            (batch, *(sum(ap) / len(ap) for ap in zip(*aps)))
            for batch, aps in sorted(by_batch.items())
        ]
        for key, by_batch in groups.items()
    }


def _label(norm: str, processes: int) -> str:
    return NORMS[norm] + (f" ({processes} processes)" if processes > 1 else "")


def _plot(rows, path, *, images: int, split: str, overwrite: bool, statistics=None) -> None:
    from matplotlib.figure import Figure

    from gn_det.visualize import save_figure

    figure = Figure(figsize=(9, 3.6 if not statistics else 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    every_batch = sorted({r["batch"] for r in rows})
    for ax, key, title in zip(axes, ("box_ap", "mask_ap"), ("box AP", "mask AP")):
        for index, norm in enumerate(NORMS):
            found = {
                r["batch"]: (*r[f"{split}/{key}"], r["processes"])
                for r in rows
                if r["norm"] == norm
            }
            if found:
                # A batch size the norm has no cell at is a gap in its line, not a straight segment.
                means, spreads, _ = zip(
                    *(found.get(b, (math.nan, math.nan, 1)) for b in every_batch)
                )
                ax.errorbar(
                    every_batch,
                    means,
                    yerr=[s / 2 for s in spreads],
                    marker="o",
                    capsize=3,
                    color=f"C{index}",
                    label=_label(norm, next(iter(found.values()))[2]),
                )
        for (norm, processes, mode), points in (statistics or {}).items():
            if len(points) < 2:
                continue  # one batch size: a table entry, not a line
            style, what = BN_STATISTICS[mode]
            batches, box, mask = zip(*points)
            ax.plot(
                batches,
                box if key == "box_ap" else mask,
                style,
                marker=".",
                color=f"C{list(NORMS).index(norm)}",
                label=f"{_label(norm, processes)}, {what}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(every_batch, [str(b) for b in every_batch])
        ax.set_xlabel("images per batch (per process)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}, {split}, {images} images seen", fontsize=10)
    if statistics:
        figure.legend(
            *axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8
        )
    else:
        axes[0].legend()
    save_figure(figure, path, overwrite=overwrite)


def _cell(row, split, key) -> str:
    mean, spread = row[f"{split}/{key}"]
    return f"{mean:.1f}" + (f" ± {spread / 2:.1f}" if row["seeds"] > 1 else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/small_batch", help="one folder per cell")
    parser.add_argument("--plot", default=None, help="PNG to write (default: in --output-dir)")
    parser.add_argument("--norms", nargs="+", choices=list(NORMS), default=list(NORMS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument(
        "--base-lrs",
        nargs="+",
        type=float,
        default=None,
        help="LRs at the configs' batch, each a cell (default: each config's own)",
    )
    parser.add_argument(
        "--lr-scaling",
        choices=("linear", "sqrt"),
        default="linear",
        help="how the LR follows the batch (default linear; sqrt: cells named *_sqrt_s*)",
    )
    parser.add_argument(
        "--data",
        choices=("shapes", "shapes_hr"),
        default="shapes",
        help="train on shapes_train (256x256) or shapes_hr_train (1200x1600, resized)",
    )
    parser.add_argument(
        "--hr-size", type=int, default=600, help="--data shapes_hr: short side (default 600)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="SyncBN's processes, each of --batches images (default 2)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images seen per run (default: the configs' MAX_ITER x IMS_PER_BATCH)",
    )
    parser.add_argument(
        "--eval-period",
        type=int,
        default=1200,
        help="evaluate shapes_val every this many images (0: only at the end)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells run at a time (default 1)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each finished cell's periodic checkpoints (to evaluate them "
                        "afterwards: lab/tools/ws_study.py); by default only the final weights")
    parser.add_argument("--force", action="store_true", help="overwrite --plot")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny images and 4 images seen (tests)"
    )
    parser.add_argument(
        "--bn-statistics",
        nargs="+",
        default=(),
        metavar="JSON",
        help="lab/tools/bn_statistics_study.py --json outputs: plot their cells' precise and "
        "per-image statistics too",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report and plot the cells that finished",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.eval_period = min(args.images or 4, 4), 0
    if (
        min(args.batches) < 1
        or args.jobs < 1
        or args.processes < 1
        or (args.images is not None and args.images < 1)
    ):
        parser.error("--batches, --jobs, --processes and --images must be positive")
    if args.base_lrs is not None and min(args.base_lrs) <= 0:
        parser.error("--base-lrs must be positive")
    args.splits = HR_SPLITS if args.data == "shapes_hr" else SPLITS
    for path in args.bn_statistics:
        if not Path(path).is_file():
            parser.error(f"--bn-statistics {path}: no such file")
    plot = Path(args.plot or Path(args.output_dir) / "small_batch.png")
    if plot.exists() and not args.force:
        parser.error(f"{plot} exists; pass --force to overwrite")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    configs = {norm: config_schedule(norm) for norm in args.norms}
    # Seed by seed, so that a grid stopped midway has whole seeds; within one, batch by batch in
    # the order given (--batches 8 1 2 4: the ends first).
    grid = [
        (norm, batch, lr, seed)
        for seed in args.seeds
        for batch in dict.fromkeys(args.batches)
        for norm in args.norms
        for lr in (args.base_lrs or [configs[norm]["base_lr"]])
    ]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        cells = list(pool.map(lambda g: run_cell(*g, args, configs[g[0]]), grid))
    for (norm, batch, lr, seed), cell in zip(grid, cells):
        if cell is None:
            print(
                f"{norm} at {batch}, LR {lr:g}, seed {seed}: not run (--report-only)",
                file=sys.stderr,
            )
    cells = [c for c in cells if c is not None]
    (Path(args.output_dir) / "results.json").write_text(json.dumps(cells, indent=1))
    rows = summarize(cells, args.splits)
    val, test = args.splits
    print(
        f"| norm | images/batch | processes | iterations | LR | seeds | box AP {val} | "
        f"mask AP {val} | "
        f"box AP {test} | mask AP {test} | minutes per run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        config = configs[row["norm"]]
        images = args.images or config["images"]
        step_images = row["batch"] * row["processes"]
        lr = scaled_lr(row["base_lr"], step_images / config["batch"], args.lr_scaling)
        print(
            f"| {NORMS[row['norm']]} | {row['batch']} | {row['processes']} | "
            f"{images // step_images} | {lr:g} | "
            f"{row['seeds']} | {_cell(row, val, 'box_ap')} | {_cell(row, val, 'mask_ap')} | "
            f"{_cell(row, test, 'box_ap')} | {_cell(row, test, 'mask_ap')} | {row['minutes']:.1f} |"
        )
    for c in cells:
        if "failure" in c:
            print(
                f"{c['run_dir']}: failed ({c['failure']}); see {c['run_dir']}/stdout.txt",
                file=sys.stderr,
            )
    images = args.images or max(config["images"] for config in configs.values())
    found = {
        run: result
        for path in args.bn_statistics
        for run, result in json.loads(Path(path).read_text()).items()
    }
    statistics = statistics_points(cells, found, test) if found else None
    _plot(
        best_rows(rows, args.splits),
        plot,
        images=images,
        split=test,
        overwrite=args.force,
        statistics=statistics,
    )
    print(f"Wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
