#!/usr/bin/env python
"""The small-batch study: box and mask AP against images per batch for BN, GN and no norm.

    tools/small_batch_study.py --output-dir output/small_batch --plot docs/images/small_batch.png
    tools/small_batch_study.py --smoke --output-dir /tmp/sb     # seconds per cell (tests)

The GN paper's Figure 1 on the shapes dataset: the shapes Mask R-CNN (R-18-FPN, from scratch)
trained with each norm config (``shapes/bn.yaml``, ``shapes/gn.yaml``, ``shapes/frozenbn.yaml``,
the last being "no norm": FrozenBN at the identity) at 1, 2, 4 and 8 images per batch. Every
run sees the same number of images (``--images``); the learning rate is the config's rate per
image times the batch (linear scaling), the warmup and the LR step are fixed in images too. Each
cell is one ``tools/train_net.py`` process (its own OUTPUT_DIR, metrics.json and final COCO
evaluation on ``shapes_val``; ``gn_det.studies.runs``); a cell that already finished is read,
not rerun, so an interrupted grid resumes. ``--jobs 2`` runs two cells at a time, one thread each.

Prints a markdown table of box AP / mask AP per cell and writes the PNG (AP against images per
batch, one line per norm) and ``results.json`` in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
from pathlib import Path

NORMS = {"bn": "BN", "gn": "GN", "frozenbn": "no norm (FrozenBN)"}
# The configs' own schedule (Base-shapes.yaml) at 2 images per batch, stated in images.
CONFIG_BATCH = 2
WARMUP_IMAGES = 200
STEP_FRACTION = 0.78  # LR drop at 350 of 450 iterations in the configs


def schedule(base_lr: float, batch: int, images: int) -> list:
    """detectron2 overrides for ``batch`` images per batch and ``images`` images seen."""
    iterations = max(1, images // batch)
    step = min(round(iterations * STEP_FRACTION), iterations - 1)
    return ["SOLVER.IMS_PER_BATCH", str(batch),
            "SOLVER.BASE_LR", repr(base_lr / CONFIG_BATCH * batch),
            "SOLVER.MAX_ITER", str(iterations),
            "SOLVER.WARMUP_ITERS", str(max(1, WARMUP_IMAGES // batch)),
            "SOLVER.STEPS", f"({step},)" if step >= 1 else "()"]


def _config_lr(norm: str) -> float:
    from gn_det.config import load_config, resolve_config_name

    cfg = load_config(resolve_config_name(f"shapes/{norm}.yaml"))
    if cfg.SOLVER.IMS_PER_BATCH != CONFIG_BATCH:
        raise ValueError(f"shapes/{norm}.yaml: IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH}, "
                         f"expected {CONFIG_BATCH}")
    return cfg.SOLVER.BASE_LR


def run_cell(norm: str, batch: int, args, base_lr: float) -> dict:
    """Train and evaluate one cell in its own process (or read its finished results)."""
    from gn_det.studies.runs import SMOKE_OPTS, finished_run, threads_per_job, train_run

    run_dir = Path(args.output_dir) / f"{norm}_b{batch}"
    if args.report_only:
        record = finished_run(run_dir)
        return None if record is None else {"norm": norm, "batch": batch, "run_dir": str(run_dir), **record}
    opts = [*schedule(base_lr, batch, args.images), "SEED", str(args.seed), *(SMOKE_OPTS if args.smoke else [])]
    record = train_run(f"shapes/{norm}.yaml", opts, run_dir, threads=threads_per_job(args.jobs))
    return {"norm": norm, "batch": batch, "run_dir": str(run_dir), **record}


def _plot(cells, path, *, images: int, overwrite: bool) -> None:
    from matplotlib.figure import Figure

    from gn_det.visualize import save_figure

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, key, title in zip(axes, ("box_ap", "mask_ap"), ("box AP", "mask AP")):
        for index, norm in enumerate(NORMS):
            points = sorted((c["batch"], c[key]) for c in cells if c["norm"] == norm)
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{index}", label=NORMS[norm])
        ax.set_xscale("log", base=2)
        batches = sorted({c["batch"] for c in cells})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("images per batch")
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}, shapes_val, {images} images seen", fontsize=10)
    axes[0].legend()
    save_figure(figure, path, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/small_batch", help="one folder per cell")
    parser.add_argument("--plot", default=None, help="PNG to write (default: in --output-dir)")
    parser.add_argument("--norms", nargs="+", choices=list(NORMS), default=list(NORMS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--images", type=int, default=640, help="images seen per run (default 640)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at a time (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="overwrite --plot")
    parser.add_argument("--smoke", action="store_true", help="tiny images and 4 images seen (tests)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report and plot the cells that finished")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images = min(args.images, 4)
    if min(args.batches) < 1 or args.jobs < 1 or args.images < 1:
        parser.error("--batches, --jobs and --images must be positive")
    plot = Path(args.plot or Path(args.output_dir) / "small_batch.png")
    if plot.exists() and not args.force:
        parser.error(f"{plot} exists; pass --force to overwrite")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    lrs = {norm: _config_lr(norm) for norm in args.norms}
    grid = [(norm, batch) for batch in sorted(args.batches) for norm in args.norms]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        cells = list(pool.map(lambda nb: run_cell(*nb, args, lrs[nb[0]]), grid))
    for (norm, batch), cell in zip(grid, cells):
        if cell is None:
            print(f"{norm} at {batch}: not run (--report-only)", file=sys.stderr)
    cells = [c for c in cells if c is not None]
    (Path(args.output_dir) / "results.json").write_text(json.dumps(cells, indent=1))
    print(f"| norm | images/batch | iterations | LR | box AP | mask AP | minutes |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        lr = lrs[c["norm"]] / CONFIG_BATCH * c["batch"]
        minutes = f"{c['seconds'] / 60:.1f}"
        print(f"| {NORMS[c['norm']]} | {c['batch']} | {args.images // c['batch']} | {lr:g} | "
              f"{c['box_ap']:.1f} | {c['mask_ap']:.1f} | {minutes} |")
    for c in cells:
        if "failure" in c:
            print(f"{c['norm']} at {c['batch']}: failed ({c['failure']}); see {c['run_dir']}/stdout.txt",
                  file=sys.stderr)
    _plot(cells, plot, images=args.images, overwrite=args.force)
    print(f"Wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
