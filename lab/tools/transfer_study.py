#!/usr/bin/env python
"""Weight-transfer fidelity study: copy vs stats vs calibrate, at feature and detector level.

Feature level (ResNet-18, synthetic images; ``gn_det_lab.transfer.transfer_fidelity``):

    lab/tools/transfer_study.py --output lab/images/transfer_fidelity.png      # ~2 min on 2 cores
    lab/tools/transfer_study.py --smoke                                           # seconds (tests)
    lab/tools/transfer_study.py --from-results --output lab/images/transfer_fidelity.png --force

prints a markdown table (cosine of each stage's output to the BN teacher's, on held-out
images) and writes a PNG of the final-stage cosine per method, one panel per regime;
``--from-results`` draws that PNG from the committed lab/results/transfer_fidelity.json instead
of running the study.

Detector level (the shapes Mask R-CNN; a BN teacher trained at 8 images per batch by
``configs/shapes/bn_teacher.yaml``):

    tools/train_net.py --config shapes/bn_teacher.yaml
    lab/tools/transfer_study.py --detector output/shapes_bn_teacher/model_final.pth \
        --output-dir output/transfer_study --output transfer_finetune.png --jobs 2

1. converts the teacher to GN by ``copy``, ``stats`` and ``stats`` + ``calibrate`` on 8, 32
   and 128 training images, ``calibrate`` 32 + ``distill`` 100 and 300 steps, and ``stats`` +
   ``distill`` (GN affine alone, and with the ROI heads' weights), and evaluates each without
   training (box/mask AP on shapes_val,
   cosine of each FPN level to the teacher's; ``gn_det_lab.transfer.detector_zero_shot``);
2. fine-tunes at 2 images per batch for ``--finetune-iters`` iterations, evaluating every
   ``--eval-period``: the copy, stats, calibrated and distilled GN students, the teacher kept
   as BN (batch statistics of 2 images), and GN from scratch (its config's learning rate); one
   ``tools/train_net.py`` process each (``gn_det_lab.runs``; finished runs are reused);
3. prints both tables and plots AP against iteration.
"""

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path

from gn_det_lab.transfer import STAGES, FidelityRow, transfer_fidelity
from gn_det_lab.runs import SMOKE_OPTS, threads_per_job, train_run
from gn_det.visualize import save_figure

# Fine-tuning a trained model at 2 images per batch: the teacher's final per-image learning rate
# (0.08 / 10 after its LR drop, at 8 images: 0.001 per image), a short warmup, no drop.
FINETUNE_OPTS = ["SOLVER.BASE_LR", "0.002", "SOLVER.WARMUP_ITERS", "20", "SOLVER.STEPS", "()"]
SCRATCH_OPTS = ["SOLVER.STEPS", "()"]  # the config's own from-scratch LR and warmup
FINETUNE_RUNS = ("copy", "stats", "calibrate", "distill", "bn", "scratch")


#: The committed results of the feature-level study (lab/benchmarks.md, "Weight-transfer
#: fidelity"), which ``--from-results`` draws without rerunning it.
RESULTS = Path(__file__).resolve().parents[1] / "results" / "transfer_fidelity.json"


def rows_from_results(path=RESULTS) -> list:
    """The study's rows as its results file holds them (emphasis dropped), as FidelityRows."""
    result = json.loads(Path(path).read_text())
    index = {name: result["columns"].index(name) for name in ("regime", "method", "seconds")}

    def text(cell):
        return cell.replace("**", "").strip()

    return [
        FidelityRow(
            regime=text(row[index["regime"]]),
            method=text(row[index["method"]]),
            cosines={s: float(text(row[result["columns"].index(s)])) for s in STAGES},
            seconds=float(text(row[index["seconds"]])),
        )
        for row in result["rows"]
    ]


def _figure(rows, unzoomed=("copy",)):
    """Layer4 cosine per method (one row each, names read horizontally), one panel, colour and
    marker per regime. Each panel is zoomed to its regime's methods other than ``unzoomed``; a
    value outside it sits at the edge as a triangle with its number. The dotted line is
    ``stats``, the transfer the others start from."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    regimes = list(dict.fromkeys(r.regime for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    figure = Figure(figsize=(9, 0.3 * len(methods) + 1.4), layout="constrained")
    axes = figure.subplots(1, len(regimes), sharey=True, squeeze=False)[0]
    for i, (ax, regime) in enumerate(zip(axes, regimes)):
        colour, marker = f"C{i}", "os^D"[i % 4]
        cosine = {r.method: r.cosines["layer4"] for r in rows if r.regime == regime}
        zoomed = [v for m, v in cosine.items() if m not in unzoomed] or list(cosine.values())
        margin = 0.08 * (max(zoomed) - min(zoomed)) + 0.005
        low, high = min(zoomed) - margin, max(zoomed) + margin
        inside = [(cosine[m], j) for j, m in enumerate(methods) if low <= cosine.get(m, -2) <= high]
        ax.plot(*zip(*inside), marker, color=colour, linestyle="none")
        for j, m in enumerate(methods):
            if m in cosine and not low <= cosine[m] <= high:
                edge = low if cosine[m] < low else high
                ax.plot(edge, j, "<" if cosine[m] < low else ">", color=colour, clip_on=False)
                ax.annotate(
                    f"{cosine[m]:.3f}",
                    (edge, j),
                    xytext=(8 if cosine[m] < low else -8, 0),
                    textcoords="offset points",
                    ha="left" if cosine[m] < low else "right",
                    va="center",
                    fontsize=8,
                    color=colour,
                )
        if "stats" in cosine:
            ax.axvline(cosine["stats"], color="gray", linestyle=":", linewidth=1)
        ax.set_xlim(low, high)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
        ax.set_title(regime, fontsize=10, color=colour)
        ax.set_xlabel("layer4 cosine to the BN teacher")
    axes[0].set_yticks(range(len(methods)), methods, fontsize=9)
    axes[0].set_ylim(len(methods) - 0.5, -0.5)  # the table's order, top to bottom
    figure.suptitle(
        "BN -> GN weight transfer, ResNet-18: mean over held-out images, one run (dotted: stats)",
        fontsize=10,
    )
    return figure


def _plot(rows, path):
    save_figure(_figure(rows), path, overwrite=True)  # main() refuses an existing --output


def finetune_runs(rows, args) -> dict:
    """Run (or read back) the fine-tuning runs; returns label -> train_run record."""
    by_method = {r.method: r for r in rows}
    calibrated = f"calibrate {args.finetune_calibration}"
    distilled = f"{calibrated} + distill {args.distill_steps[0]}" if args.distill_steps else None
    common = [
        "SOLVER.MAX_ITER",
        str(args.finetune_iters),
        "TEST.EVAL_PERIOD",
        str(args.eval_period),
        "SEED",
        "1",
        *(SMOKE_OPTS if args.smoke else []),
    ]
    finetune = ["MODEL.WEIGHTS", None, *FINETUNE_OPTS]
    runs = {  # name -> (label, config, options)
        "copy": ("GN from copy", "shapes/gn.yaml", finetune),
        "stats": ("GN from stats", "shapes/gn.yaml", finetune),
        "calibrate": (f"GN from {calibrated}", "shapes/gn.yaml", finetune),
        "distill": (f"GN from {distilled}", "shapes/gn.yaml", finetune),
        "bn": ("BN teacher at 2 images", "shapes/bn.yaml", finetune),
        "scratch": ("GN from scratch", "shapes/gn.yaml", ["MODEL.WEIGHTS", "", *SCRATCH_OPTS]),
    }
    weights = {
        "copy": by_method["copy"].weights,
        "stats": by_method["stats"].weights,
        "calibrate": by_method[calibrated].weights,
        "bn": args.detector,
    }
    if distilled:
        weights["distill"] = by_method[distilled].weights
    runs = {
        label: (config, [weights.get(name) if o is None else o for o in opts])
        for name, (label, config, opts) in runs.items()
        if name in args.runs and (name != "distill" or distilled)
    }
    threads = threads_per_job(args.jobs)

    def run(item):
        label, (config, opts) = item
        folder = Path(args.output_dir) / "finetune" / label.replace(" ", "_")
        return label, train_run(config, [*opts, *common], folder, threads=threads)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        return dict(pool.map(run, runs.items()))


def _plot_finetune(rows, runs, path, *, force: bool) -> None:
    from matplotlib.figure import Figure

    zero_shot = {r.method: r for r in rows}
    teacher = zero_shot["BN teacher"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    for ax, key, title in zip(figure.subplots(1, 2), ("box_ap", "mask_ap"), ("box AP", "mask AP")):
        ax.axhline(
            getattr(teacher, key),
            color="k",
            linestyle="--",
            linewidth=1,
            label="BN teacher (8 images per batch)",
        )
        for index, (label, record) in enumerate(runs.items()):
            points = [(e["iteration"], e[key]) for e in record["evaluations"]]
            start = label.removeprefix("GN from ")
            if start in zero_shot:  # the converted model before any training
                points.insert(0, (0, getattr(zero_shot[start], key)))
            elif label.startswith("BN teacher"):
                points.insert(0, (0, getattr(teacher, key)))
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=f"C{index}", label=label)
        ax.set_xlabel("iterations at 2 images per batch")
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title} on shapes_val", fontsize=10)
    figure.axes[0].legend(fontsize=7)
    save_figure(figure, path, overwrite=force)


def detector_main(args) -> int:
    from gn_det_lab.transfer import detector_zero_shot

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    counts = (2,) if args.smoke else tuple(args.calibration_images)
    if args.finetune_calibration not in counts:
        args.finetune_calibration = counts[len(counts) // 2]
    rows = detector_zero_shot(
        args.detector,
        os.path.join(args.output_dir, "zero_shot"),
        calibration_counts=counts,
        distill_steps=args.distill_steps,
        distill_images=args.finetune_calibration,
        cosine_images=2 if args.smoke else 16,
        opts=SMOKE_OPTS if args.smoke else (),
    )
    teacher = rows[0]
    levels = list(teacher.cosines)
    print(
        "| model | box AP | mask AP | box AP / teacher's | "
        + " | ".join(f"cos {level}" for level in levels)
        + " | seconds |"
    )
    print("|---|---|---|---|" + "---|" * len(levels) + "---|")
    for r in rows:
        ratio = r.box_ap / teacher.box_ap if teacher.box_ap else float("nan")
        print(
            f"| {r.method} | {r.box_ap:.1f} | {r.mask_ap:.1f} | {ratio:.2f} | "
            + " | ".join(f"{r.cosines[level]:.3f}" for level in levels)
            + f" | {r.seconds:.1f} |"
        )
    runs = finetune_runs(rows, args)
    print("\n| fine-tuned at 2 images per batch | iteration | box AP | mask AP |")
    print("|---|---|---|---|")
    for label, record in runs.items():
        for e in record["evaluations"]:
            print(f"| {label} | {e['iteration']} | {e['box_ap']:.1f} | {e['mask_ap']:.1f} |")
        if "failure" in record:
            print(f"| {label} | failed: {record['failure']} | | |")
    results = {"zero_shot": [vars(r) for r in rows], "finetune": runs}
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=1))
    if args.output:
        _plot_finetune(rows, runs, args.output, force=args.force)
        print(f"Wrote {args.output}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="PNG plot to write")
    parser.add_argument("--force", action="store_true", help="overwrite --output")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument(
        "--from-results",
        nargs="?",
        const=str(RESULTS),
        default=None,
        metavar="JSON",
        help="draw --output from the feature-level study's results file (default "
        "lab/results/transfer_fidelity.json) instead of running the study",
    )
    detector = parser.add_argument_group("detector level")
    detector.add_argument(
        "--detector",
        metavar="TEACHER_WEIGHTS",
        default=None,
        help="run the detector-level study from this BN teacher (shapes/bn.yaml)",
    )
    detector.add_argument("--output-dir", default="output/transfer_study")
    detector.add_argument("--calibration-images", type=int, nargs="+", default=[8, 32, 128])
    detector.add_argument(
        "--finetune-calibration",
        type=int,
        default=32,
        help="which calibrated student is fine-tuned (default 32 images)",
    )
    detector.add_argument(
        "--distill-steps",
        type=int,
        nargs="*",
        default=[100, 300],
        help="also calibrate on --finetune-calibration images, then distill this "
        "many steps (gn_det.distill); one zero-shot row each (default 100 300)",
    )
    detector.add_argument("--finetune-iters", type=int, default=200)
    detector.add_argument("--eval-period", type=int, default=50)
    detector.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at a time")
    detector.add_argument(
        "--runs",
        nargs="*",
        default=list(FINETUNE_RUNS),
        choices=FINETUNE_RUNS,
        help="fine-tuning runs (default all; none: zero-shot only): GN from copy, "
        "stats, calibrate, distill (the first --distill-steps row), scratch; BN "
        "teacher at 2 images (bn)",
    )
    args = parser.parse_args(argv)
    if args.output and os.path.exists(args.output) and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite")
    if args.from_results:
        if not args.output:
            parser.error("--from-results draws --output; name it")
        _plot(rows_from_results(args.from_results), args.output)
        return 0
    if args.detector:
        if args.smoke:
            args.finetune_iters, args.eval_period = 2, 1
            args.distill_steps = args.distill_steps[:1] and [1]
        return detector_main(args)
    kwargs = (
        dict(size=32, population=16, held_out=4, calibration_counts=(2, 4), distill_steps=(1,))
        if args.smoke
        else {}
    )
    rows = transfer_fidelity(**kwargs)
    print("| regime | method | " + " | ".join(STAGES) + " | seconds |")
    print("|---|---|" + "---|" * len(STAGES) + "---|")
    for r in rows:
        print(
            f"| {r.regime} | {r.method} | "
            + " | ".join(f"{r.cosines[s]:.3f}" for s in STAGES)
            + f" | {r.seconds:.1f} |"
        )
    if args.output:
        _plot(rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
