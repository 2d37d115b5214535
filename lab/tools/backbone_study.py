#!/usr/bin/env python
"""The backbone route: a BN-pretrained backbone converted to GN, fine-tuned at 1 image per
batch, against a GN-pretrained backbone, FrozenBN and GN from scratch.

    lab/tools/backbone_study.py pretrain --output-dir output/backbone --norms bn gn --jobs 2
    lab/tools/backbone_study.py finetune --output-dir output/backbone --starts frozenbn copy \\
        stats distill gn_pretrained scratch --lr-factors 1 0.5 --seeds 1 --jobs 2
    lab/tools/backbone_study.py report --output-dir output/backbone \\
        --plot lab/images/backbone_route.png --json lab/results/backbone_route.json
    lab/tools/backbone_study.py ... --smoke          # seconds per stage (tests)

1. **pretrain** (``gn_det_lab.pretrain``): the shapes detector's R-18 body with a per-pixel
   classifier on a proxy task of the shapes generator (96x96, 1-3 shapes, its own seed; each
   pixel's class), with BN and with GN, batch 32; each writes ``pretrain_<norm>/backbone.pkl``
   (detectron2's ImageNet format) and its curve (``metrics.jsonl``).
2. **finetune**: the shapes Mask R-CNN (``shapes/*.yaml``) at ``--batch`` images per batch from
   each start of ``gn_det_lab.backbone.STARTS``, the same schedule for all
   (``--iterations``, LR ×0.1 at 80 %), at each ``--lr-factors`` × the config's LR scaled to the
   batch by its square root (AdamW), evaluated on the validation split every
   ``--eval-period`` iterations (a checkpoint each time). The ``distill`` start first runs
   ``gn-det convert --transfer distill`` on the BN backbone with 32 unlabeled proxy images.
   Each finished run's checkpoints (seed 1's; the final weights of other seeds) are then
   evaluated on the large held-out split (``shapes_large_test``: 500 images;
   ``shapes_hr_large_test``: 50) with 200-resample bootstrap intervals over images
   (``gn_det_lab.bootstrap``), about 1.5 minutes of one thread per checkpoint at 256².
3. **report**: per start the LR with the best final box AP on the validation split; a markdown
   table (seed 1's final AP on the large split with its 95 % interval, the other seeds' final
   AP, their mean), the plot (AP on the large split against fine-tuning iterations, one line
   per start, intervals as bars, other seeds' final AP as crosses) and a JSON of it all.

Every run is its own ``gn-det train`` process (``gn_det_lab.runs``): finished runs are read
back, stopped ones resume.
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

DATA = {  # --data: (train split, validation split, large test split, short side, long side)
    "shapes": ("shapes_train", "shapes_val", "shapes_large_test", 256, 256),
    "shapes_hr": ("shapes_hr_train", "shapes_hr_val", "shapes_hr_large_test", 600, 800),
}
SMOKE_PROXY = {"num_train": 64, "num_val": 16}


def _weights(args) -> dict:
    root = Path(args.output_dir)
    return {
        "bn": str(root / "pretrain_bn" / "backbone.pkl"),
        "gn": str(root / "pretrain_gn" / "backbone.pkl"),
        "distilled": str(root / "distilled_bn_to_gn.pkl"),
    }


def _proxy(args):
    import dataclasses

    from gn_det_lab.pretrain import PROXY

    return dataclasses.replace(PROXY, **SMOKE_PROXY) if args.smoke else PROXY


def pretrain_one(norm: str, args) -> dict:
    import torch

    from gn_det_lab.pretrain import pretrain

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    steps = 4 if args.smoke else args.pretrain_steps
    return pretrain(
        norm.upper(),
        Path(args.output_dir) / f"pretrain_{norm}",
        steps=steps,
        eval_period=2 if args.smoke else args.pretrain_eval_period,
        warmup=2 if args.smoke else 100,
        batch_size=8 if args.smoke else 32,
        spec=_proxy(args),
    )


def distill_backbone(args) -> str:
    """``gn-det convert --transfer distill`` of the BN backbone on unlabeled proxy images."""
    from gn_det_lab.pretrain import write_proxy_images
    from gn_det_lab.runs import SMOKE_OPTS

    weights = _weights(args)
    if Path(weights["distilled"]).is_file():
        return weights["distilled"]
    images = write_proxy_images(_proxy(args), "train", 32, Path(args.output_dir) / "proxy_images")
    command = [
        sys.executable,
        "-m",
        "gn_det.cli",
        "convert",
        "--config",
        "shapes/bn.yaml",
        "--weights",
        weights["bn"],
        "--transfer",
        "distill",
        "--calib-images-dir",
        str(images),
        "--output",
        weights["distilled"],
    ]
    if args.smoke:
        command += ["--calib-images", "2", "--calib-distill-steps", "1", *SMOKE_OPTS[4:8]]
    subprocess.run(command, check=True)
    return weights["distilled"]


def _schedule(config: str, batch: int, factor: float, iterations: int) -> list:
    from gn_det.cli.config_files import load_config, resolve_config_name

    solver = load_config(resolve_config_name(config)).SOLVER
    lr = solver.BASE_LR * math.sqrt(batch / solver.IMS_PER_BATCH) * factor
    return [
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.BASE_LR",
        repr(lr),
        "SOLVER.MAX_ITER",
        str(iterations),
        "SOLVER.WARMUP_ITERS",
        str(max(1, min(100, iterations // 10))),
        "SOLVER.STEPS",
        f"({max(1, min(iterations - 1, round(iterations * 0.8)))},)",
    ]


CHILD = "GN_DET_BACKBONE_STUDY_CHILD"  # set for the processes the tool starts itself
COMMANDS = "commands.txt"  # in --output-dir: every pretrain / finetune command run there, in order


def command_line(argv) -> str:
    """This tool's command line as a user types it."""
    return " ".join(["lab/tools/backbone_study.py", *(argv if argv is not None else sys.argv[1:])])


def record_command(output_dir, argv) -> None:
    """Append this command line to ``output_dir/commands.txt`` (the report quotes them)."""
    with open(Path(output_dir) / COMMANDS, "a") as f:
        f.write(command_line(argv) + "\n")


def cell_name(start: str, batch: int, iterations: int, factor: float, seed: int, data: str) -> str:
    prefix = "hr_" if data == "shapes_hr" else ""
    return f"{prefix}{start}_b{batch}_i{iterations}_lr{factor:g}x_s{seed}"


def finetune_one(start: str, factor: float, seed: int, args) -> dict:
    """Train one cell (or read it), then its checkpoints' intervals on the large split."""
    from gn_det_lab.backbone import start_config
    from gn_det_lab.runs import SMOKE_OPTS, threads_per_job, train_run

    train, val, large, short, long = DATA[args.data]
    iterations = 2 if args.smoke else args.iterations
    run_dir = Path(args.output_dir) / cell_name(
        start, args.batch, iterations, factor, seed, args.data
    )
    config, opts = start_config(start, _weights(args))
    if args.freeze_at is not None:
        opts += ["MODEL.BACKBONE.FREEZE_AT", str(args.freeze_at)]
    period = iterations if args.smoke else args.eval_period
    opts += [
        *_schedule(config, args.batch, factor, iterations),
        "SEED",
        str(seed),
        "TEST.EVAL_PERIOD",
        str(period),
        "SOLVER.CHECKPOINT_PERIOD",
        str(period),
        "DATASETS.TRAIN",
        f"('{train}',)",
    ]
    if args.smoke:
        opts += SMOKE_OPTS
    elif args.data != "shapes":
        opts += [
            "INPUT.MIN_SIZE_TRAIN",
            f"({short},)",
            "INPUT.MAX_SIZE_TRAIN",
            str(long),
            "INPUT.MIN_SIZE_TEST",
            str(short),
            "INPUT.MAX_SIZE_TEST",
            str(long),
        ]
    threads = args.threads or threads_per_job(args.jobs)
    # Seed 1's checkpoints make the curve on the large split; other seeds add their final point.
    keep = seed == 1 or args.large_checkpoints is not None
    record = train_run(
        config, opts, run_dir, datasets=[val], threads=threads, keep_checkpoints=keep
    )
    cell = {
        "start": start,
        "batch": args.batch,
        "iterations": iterations,
        "lr_factor": factor,
        "seed": seed,
        "data": args.data,
        "run_dir": str(run_dir),
        **record,
    }
    if args.large_checkpoints == 0:  # a sweep's run: the validation split decides
        return cell
    if record.get("returncode") == 0 and not math.isnan(record.get("box_ap", math.nan)):
        if args.smoke:  # the tests: in this process, one cell at a time, no interpreter to start
            from gn_det_lab.backbone import checkpoint_intervals

            with _IN_PROCESS:
                checkpoint_intervals(
                    run_dir, "shapes_val", resamples=20, last=args.large_checkpoints
                )
            return cell
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        subprocess.run(
            [
                sys.executable,
                __file__,
                "intervals",
                "--run-dir",
                str(run_dir),
                "--dataset",
                large,
                "--resamples",
                str(args.resamples),
                *(
                    ["--large-checkpoints", str(args.large_checkpoints)]
                    if args.large_checkpoints
                    else []
                ),
            ],
            check=True,
            env=env,
        )
    return cell


def swept_factor(start: str, args) -> float:
    """The factor of ``--lr-factors`` whose ``--lr-from-sweep`` run of ``start`` (seed 1) had the
    best final box AP on the validation split (every one must have finished)."""
    return best_factor(sweep(start, args))


def best_factor(records: list) -> float:
    """The factor of ``[(factor, record)]`` (a sweep) with the best box AP (NaN: diverged)."""
    found = {factor: record["box_ap"] for factor, record in records}
    return max(found, key=lambda f: -math.inf if math.isnan(found[f]) else found[f])


def sweep(start: str, args) -> list:
    """[(factor, record)] of the ``--lr-from-sweep`` runs of ``start`` (seed 1), one per
    ``--lr-factors``; every one must have finished."""
    from gn_det_lab.runs import finished_run

    found = []
    for factor in args.lr_factors:
        name = cell_name(start, args.batch, args.lr_from_sweep, factor, 1, args.data)
        record = finished_run(Path(args.output_dir) / name)
        if not record:
            raise SystemExit(f"the LR sweep's run {name} has not finished in {args.output_dir}")
        found.append((factor, record))
    return found


_IN_PROCESS = threading.Lock()  # --smoke's intervals, evaluated in this process


def read_cells(args) -> list:
    """Every finished cell in ``--output-dir`` with its intervals."""
    from gn_det_lab.runs import finished_run

    cells = []
    for run_dir in sorted(Path(args.output_dir).iterdir()):
        record = finished_run(run_dir) if run_dir.is_dir() else None
        intervals = sorted(run_dir.glob("intervals_*.json")) if record else []
        curve = json.loads(intervals[0].read_text()) if intervals else []
        if not record or not curve or curve[-1]["checkpoint"] != "model_final.pth":
            continue  # not finished, or its intervals are still being computed
        parts = run_dir.name.split("_")
        data = "shapes_hr" if parts[0] == "hr" else "shapes"
        parts = parts[1:] if data == "shapes_hr" else parts
        seed = int(parts[-1][1:])
        factor = float(parts[-2][2:-1])
        iterations = int(parts[-3][1:])
        batch = int(parts[-4][1:])
        start = "_".join(parts[:-4])
        cells.append(
            {
                "start": start,
                "batch": batch,
                "iterations": iterations,
                "lr_factor": factor,
                "seed": seed,
                "data": data,
                "run_dir": str(run_dir),
                "record": record,
                "split": intervals[0].stem[len("intervals_") :],
                "curve": curve,
                "val": record["evaluations"],
            }
        )
    return cells


PRETRAIN_COLUMNS = [
    "backbone",
    "steps",
    "batch",
    "val pixel accuracy",
    "val shape accuracy",
    "val mIoU",
    "mIoU, last 1,000 steps",
    "minutes",
]


def read_pretraining(output_dir) -> dict:
    """norm -> (result.json, the validation points of metrics.jsonl) of each finished
    pretraining."""
    found = {}
    for norm in ("bn", "gn"):
        run = Path(output_dir) / f"pretrain_{norm}"
        if (run / "result.json").is_file():
            points = [
                json.loads(line)
                for line in (run / "metrics.jsonl").read_text().splitlines()
                if line.strip()
            ]
            found[norm] = (
                json.loads((run / "result.json").read_text()),
                [p for p in points if "val_miou" in p],
            )
    return found


def pretrain_results_path(results) -> Path:
    """Where the report keeps the pretraining results beside ``results``: <json>_pretrain.json."""
    return Path(str(Path(results).with_suffix("")) + "_pretrain.json")


def pretrain_rows(pretraining: dict) -> list:
    rows = []
    for norm, (result, points) in pretraining.items():
        before = [p for p in points if p["step"] <= result["steps"] - 1000]
        rise = f"{before[-1]['val_miou']:.3f} → {result['val_miou']:.3f}" if before else "—"
        rows.append(
            [
                f"R-18, {result['norm']}",
                f"{result['steps']:,}",
                str(result["batch_size"]),
                f"{result['val_pixel_accuracy']:.3f}",
                f"{result['val_shape_accuracy']:.3f}",
                f"{result['val_miou']:.3f}",
                rise,
                f"{result['seconds'] / 60:.0f}",
            ]
        )
    return rows


def summarize(cells: list) -> list:
    """Per (data, start, batch): the LR factor with the best mean final box AP on the
    validation split, and at it the first seed's final AP on the large split with its
    intervals and its curve, the other seeds' final AP, and the mean over seeds."""
    from gn_det_lab.backbone import STARTS

    groups = {}
    for c in cells:
        groups.setdefault((c["data"], c["start"], c["batch"], c["iterations"]), {}).setdefault(
            c["lr_factor"], []
        ).append(c)
    rows = []
    for (data, start, batch, iterations), by_factor in groups.items():

        def val_box(runs):
            return statistics.mean(r["record"]["box_ap"] for r in runs)

        factor, runs = max(by_factor.items(), key=lambda kv: val_box(kv[1]))
        runs = sorted(runs, key=lambda r: r["seed"])
        final = [r["curve"][-1] for r in runs]
        row = {
            "data": data,
            "start": start,
            "description": STARTS[start][2],
            "batch": batch,
            "iterations": iterations,
            "lr_factor": factor,
            "lr_factors_tried": sorted(by_factor),
            "seeds": [r["seed"] for r in runs],
            "split": runs[0]["split"],
            "val_box_ap": runs[0]["record"]["box_ap"],
            "val_mask_ap": runs[0]["record"]["mask_ap"],
            "minutes": statistics.mean(r["record"]["seconds"] for r in runs) / 60,
            "curve": runs[0]["curve"],
            "other_seeds": [
                {"seed": r["seed"], "box": f["box"]["ap"], "mask": f["mask"]["ap"]}
                for r, f in zip(runs[1:], final[1:])
            ],
            "mean": {
                kind: statistics.mean(f[kind]["ap"] for f in final) for kind in ("box", "mask")
            },
        }
        for kind in ("box", "mask"):
            row[kind] = dict(final[0][kind])
        rows.append(row)
    order = list(STARTS)
    return sorted(
        rows, key=lambda r: (r["data"], r["batch"], r["iterations"], order.index(r["start"]))
    )


COLUMNS = [
    "data",
    "start",
    "iterations",
    "LR ×",
    "box AP [95 % interval], seed 1",
    "mask AP [95 % interval], seed 1",
    "other seeds: box / mask AP",
    "mean over seeds: box / mask AP",
    "box / mask AP, val, seed 1",
    "minutes per run",
]


def table_rows(rows: list) -> list:
    """The table's cells, as the markdown table prints them."""
    out = []
    for r in rows:
        cells = [
            f"{r[k]['ap']:.1f} [{r[k]['low']:.1f}, {r[k]['high']:.1f}]" for k in ("box", "mask")
        ]
        others = (
            "; ".join(
                f"seed {o['seed']}: {o['box']:.1f} / {o['mask']:.1f}" for o in r["other_seeds"]
            )
            or "—"
        )
        mean = f"{r['mean']['box']:.1f} / {r['mean']['mask']:.1f}" if r["other_seeds"] else "—"
        out.append(
            [
                r["data"],
                r["description"],
                f"{r['iterations']:,}",
                f"{r['lr_factor']:g}",
                *cells,
                others,
                mean,
                f"{r['val_box_ap']:.1f} / {r['val_mask_ap']:.1f}",
                f"{r['minutes']:.0f}",
            ]
        )
    return out


def plot(rows: list, path: str, *, overwrite: bool, pretraining: dict = None) -> None:
    """Fine-tuning curves (AP on the large split, intervals as bars), one row of panels per
    dataset; below them the pretraining curves where given."""
    from matplotlib.figure import Figure

    from gn_det.visualize import save_figure

    datas = sorted({r["data"] for r in rows})
    panels = 2 * len(datas) + bool(pretraining)
    figure = Figure(figsize=(10, 3.6 * panels), layout="constrained")
    axes = figure.subplots(panels, 2, squeeze=False)
    if pretraining:
        for ax, key, label in zip(
            axes[-1], ("val_miou", "val_shape_accuracy"), ("mIoU", "shape accuracy")
        ):
            for norm, (result, points) in pretraining.items():  # colours apart from the starts'
                ax.plot(
                    [p["step"] for p in points],
                    [p[key] for p in points],
                    marker="s",
                    markersize=3,
                    color="black" if norm == "bn" else "gray",
                    linestyle="-" if norm == "bn" else "--",
                    label=f"{result['norm']}-pretrained: {result[key]:.3f}",
                )
            ax.set_title(f"pretraining on the proxy task: validation {label}", fontsize=10)
            ax.set_xlabel("pretraining steps (32 images each)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    for ax_row, data in zip(axes[len(datas) : 2 * len(datas)], datas):
        _plot_final(ax_row, [r for r in rows if r["data"] == data])
    for ax_row, data in zip(axes, datas):
        for ax, kind in zip(ax_row, ("box", "mask")):
            for index, row in enumerate(r for r in rows if r["data"] == data):
                x = [p["iteration"] for p in row["curve"]]
                y = [p[kind]["ap"] for p in row["curve"]]
                low = [p[kind]["ap"] - p[kind]["low"] for p in row["curve"]]
                high = [p[kind]["high"] - p[kind]["ap"] for p in row["curve"]]
                label = (
                    f"{index + 1}. {row['description']}: {row['box']['ap']:.1f} box / "
                    f"{row['mask']['ap']:.1f} mask"
                )
                ax.errorbar(
                    x,
                    y,
                    yerr=[low, high],
                    marker="o",
                    markersize=3,
                    capsize=2,
                    color=f"C{index}",
                    label=label if kind == "box" else None,
                )
                for other in row["other_seeds"]:  # the other seeds' final AP
                    ax.plot(
                        [x[-1] + 60], [other[kind]], marker="x", markersize=6, color=f"C{index}"
                    )
            split = next(r["split"] for r in rows if r["data"] == data)
            ax.set_title(f"{kind} AP, {split} (95 % intervals; ×: seed 2)", fontsize=10)
            ax.set_xlabel("fine-tuning iterations (1 image each)")
            ax.set_ylabel(f"{kind} AP")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    save_figure(figure, path, overwrite=overwrite)


PAIRED_COLUMNS = [
    "start",
    "LR × (val box AP of the sweep at each)",
    "box AP per seed",
    "mask AP per seed",
    "mean box / mask AP",
    "last 10 % of the schedule: box / mask AP gained",
    "minutes per run",
]


#: Short names of the starts in the paired report's labels (the descriptions are long).
SHORT = {
    "frozenbn_gn": "FrozenBN backbone (stock detectron2)",
    "stats": "converted to GN (stats)",
    "stats_ws": "converted to GN + WS (stats)",
}


def _short(start: str) -> str:
    from gn_det_lab.backbone import STARTS

    return SHORT.get(start, STARTS[start][2])


def paired(cells: list, args) -> dict:
    """The decisive pair's finals (each start at its swept LR factor, every seed) on the large
    split, and their paired difference: ``{"pair", "starts": {start: {...}}, "difference":
    {"box": ..., "mask": ...}}`` (:func:`gn_det_lab.bootstrap.paired_difference`, second start
    minus first)."""
    from gn_det_lab.backbone import STARTS
    from gn_det_lab.bootstrap import paired_difference

    starts = {}
    for start in args.pair:
        swept = sweep(start, args)
        factor = best_factor(swept)
        finals = sorted(
            (
                c
                for c in cells
                if c["start"] == start
                and c["iterations"] == args.iterations
                and c["lr_factor"] == factor
            ),
            key=lambda c: c["seed"],
        )
        starts[start] = {
            "description": STARTS[start][2],
            "lr_factor": factor,
            "sweep": {f: {"box": r["box_ap"], "mask": r["mask_ap"]} for f, r in swept},
            "seeds": {
                c["seed"]: {
                    "split": c["split"],
                    "final": c["curve"][-1],
                    "before": c["curve"][-2] if len(c["curve"]) > 1 else None,
                    "val_curve": c["val"],
                    "minutes": c["record"]["seconds"] / 60,
                }
                for c in finals
            },
        }
    a, b = (starts[s]["seeds"] for s in args.pair)
    if not a or sorted(a) != sorted(b):
        raise SystemExit(
            f"the pair needs finished finals with the same seeds: {sorted(a)}, {sorted(b)}"
        )
    difference = {
        kind: paired_difference(
            {s: (r["final"][kind]["ap"], r["final"][kind]["samples"]) for s, r in a.items()},
            {s: (r["final"][kind]["ap"], r["final"][kind]["samples"]) for s, r in b.items()},
        )
        for kind in ("box", "mask")
    }
    return {"pair": list(args.pair), "starts": starts, "difference": difference}


def _gain(run: dict, kind: str) -> float:
    return run["final"][kind]["ap"] - run["before"][kind]["ap"] if run["before"] else math.nan


def paired_rows(result: dict) -> list:
    rows = []
    for start in result["pair"]:
        r = result["starts"][start]
        runs = r["seeds"].values()
        mean = {k: statistics.mean(x["final"][k]["ap"] for x in runs) for k in ("box", "mask")}
        gain = {k: statistics.mean(_gain(x, k) for x in runs) for k in ("box", "mask")}
        rows.append(
            [
                r["description"],
                f"**{r['lr_factor']:g}** ("
                + ", ".join(f"{f:g}: {v['box']:.1f}" for f, v in r["sweep"].items())
                + ")",
                " / ".join(f"{x['final']['box']['ap']:.1f}" for x in runs),
                " / ".join(f"{x['final']['mask']['ap']:.1f}" for x in runs),
                f"{mean['box']:.1f} / {mean['mask']:.1f}",
                "—" if math.isnan(gain["box"]) else f"{gain['box']:+.1f} / {gain['mask']:+.1f}",
                f"{statistics.mean(x['minutes'] for x in runs):.0f}",
            ]
        )
    d = result["difference"]
    first, second = (_short(s) for s in result["pair"])
    rows.append(
        [
            f"difference, paired: {second} − {first}",
            "",
            " / ".join(f"{v:+.1f}" for v in d["box"]["per_seed"].values()),
            " / ".join(f"{v:+.1f}" for v in d["mask"]["per_seed"].values()),
            " / ".join(
                f"{d[k]['difference']:+.1f} [{d[k]['low']:+.1f}, {d[k]['high']:+.1f}]"
                for k in ("box", "mask")
            ),
            "",
            "",
        ]
    )
    return rows


def plot_paired(result: dict, path: str, *, overwrite: bool) -> None:
    """Four panels: the LR sweep, each seed's final AP, the paired difference with its interval,
    the validation curves (the plateau)."""
    from matplotlib.figure import Figure

    from gn_det.visualize import save_figure

    figure = Figure(figsize=(11, 8), layout="constrained")
    (sweep_ax, seeds_ax), (diff_ax, curve_ax) = figure.subplots(2, 2)
    colours = {start: f"C{i}" for i, start in enumerate(result["pair"])}
    short = {s: _short(s) for s in result["pair"]}
    for start, r in result["starts"].items():
        factors = [float(f) for f in r["sweep"]]
        sweep_ax.plot(
            factors,
            [v["box"] for v in r["sweep"].values()],
            marker="o",
            color=colours[start],
            label=short[start],
        )
        for i, kind in enumerate(("box", "mask")):
            values = [x["final"][kind]["ap"] for x in r["seeds"].values()]
            x = i + (0.15 if start == result["pair"][1] else -0.15)
            seeds_ax.plot([x] * len(values), values, "o", color=colours[start], alpha=0.6)
            seeds_ax.plot([x - 0.08, x + 0.08], [statistics.mean(values)] * 2, color=colours[start])
            for seed, run in r["seeds"].items():
                ev = run["val_curve"]
                curve_ax.plot(
                    [e["iteration"] for e in ev],
                    [e["box_ap"] for e in ev],
                    color=colours[start],
                    alpha=0.7,
                    linewidth=1,
                    label=short[start] if seed == min(r["seeds"]) and i == 0 else None,
                )
    sweep_ax.set_xscale("log", base=2)
    sweep_ax.set_title("LR sweep: validation box AP (short schedule, seed 1)", fontsize=10)
    sweep_ax.set_xlabel("LR × the config's (scaled to 1 image)")
    sweep_ax.set_ylabel("box AP, validation")
    sweep_ax.legend(fontsize=8)
    seeds_ax.set_xticks([0, 1], ["box AP", "mask AP"])
    seeds_ax.set_title("each seed's final AP on the large split (bars: means)", fontsize=10)
    d = result["difference"]
    for i, kind in enumerate(("box", "mask")):
        diff_ax.errorbar(
            [i],
            [d[kind]["difference"]],
            yerr=[
                [d[kind]["difference"] - d[kind]["low"]],
                [d[kind]["high"] - d[kind]["difference"]],
            ],
            marker="o",
            capsize=6,
            color="black",
        )
    diff_ax.axhline(0, color="gray", linewidth=1)
    diff_ax.set_xticks([0, 1], ["box AP", "mask AP"])
    diff_ax.set_xlim(-0.6, 1.6)
    second, first = (short[s] for s in reversed(result["pair"]))
    diff_ax.set_title(f"{second}\n− {first}: paired, 95 % interval", fontsize=9)
    diff_ax.set_ylabel("AP difference (mean over seeds)")
    curve_ax.set_title("validation box AP during the final runs (every seed)", fontsize=10)
    curve_ax.set_xlabel("iterations (1 image each)")
    curve_ax.set_ylim(
        bottom=max(
            0,
            min(
                e["box_ap"]
                for r in result["starts"].values()
                for x in r["seeds"].values()
                for e in x["val_curve"][-4:]
            )
            - 10,
        )
    )
    curve_ax.legend(fontsize=8)
    for ax in (sweep_ax, seeds_ax, diff_ax, curve_ax):
        ax.grid(alpha=0.3)
    save_figure(figure, path, overwrite=overwrite)


def _plot_final(axes, rows: list, *, within: float = 5.0) -> None:
    """Each start's final AP with its interval (seed 1) and the other seeds' (crosses), zoomed to
    the starts within ``within`` AP of the best: where the comparisons live. The colours are
    the curves' (the start's index)."""
    for ax, kind in zip(axes, ("box", "mask")):
        best = max(r[kind]["ap"] for r in rows)
        shown = [(i, r) for i, r in enumerate(rows) if r[kind]["ap"] >= best - within]
        for i, r in shown:
            f = r[kind]
            ax.errorbar(
                [i], [f["ap"]], yerr=[[f["ap"] - f["low"]], [f["high"] - f["ap"]]],
                marker="o", capsize=4, color=f"C{i}",
            )  # fmt: skip
            for other in r["other_seeds"]:
                ax.plot([i + 0.2], [other[kind]], marker="x", markersize=7, color=f"C{i}")
        left_out = [r["description"] for i, r in enumerate(rows) if (i, r) not in shown]
        ax.set_xticks([i for i, _ in shown], [str(i + 1) for i, _ in shown])
        ax.set_xlabel("start (numbered as in the legend)" + ("; not shown: " if left_out else "")
                      + ", ".join(left_out))  # fmt: skip
        ax.set_title(f"final {kind} AP, zoomed (seed 1 with 95 % interval; ×: seed 2)", fontsize=10)
        ax.set_ylabel(f"{kind} AP")
        ax.grid(alpha=0.3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=("pretrain", "finetune", "report", "paired", "intervals"))
    parser.add_argument("--output-dir", default="output/backbone")
    parser.add_argument("--norms", nargs="+", default=["bn", "gn"], choices=("bn", "gn"))
    parser.add_argument("--pretrain-steps", type=int, default=4000)
    parser.add_argument("--pretrain-eval-period", type=int, default=500)
    parser.add_argument(
        "--starts",
        nargs="+",
        default=["frozenbn", "copy", "stats", "distill", "gn_pretrained", "scratch"],
    )
    parser.add_argument("--data", default="shapes", choices=sorted(DATA))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3600)
    parser.add_argument("--eval-period", type=int, default=600)
    parser.add_argument("--lr-factors", nargs="+", type=float, default=[1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument(
        "--freeze-at",
        type=int,
        help="MODEL.BACKBONE.FREEZE_AT of every run (default: the config's)",
    )
    parser.add_argument(
        "--large-checkpoints",
        type=int,
        help="evaluate only each run's last N checkpoints on the large split, all seeds' (0: none)",
    )
    parser.add_argument(
        "--lr-from-sweep",
        type=int,
        metavar="ITERATIONS",
        help="finetune: each start at the LR factor of --lr-factors whose run of ITERATIONS "
        "iterations (seed 1, in --output-dir) had the best box AP on the validation split",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (default: the cores shared out over --jobs)",
    )
    parser.add_argument(
        "--pair",
        nargs=2,
        metavar=("A", "B"),
        default=["frozenbn_gn", "stats"],
        help="paired: the two starts compared (B - A), each at its --lr-from-sweep factor",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny everything (tests)")
    parser.add_argument("--plot", help="report: the PNG to write")
    parser.add_argument(
        "--from-json",
        metavar="RESULTS",
        help="report: draw --plot from this results file (and its _pretrain.json) instead of runs",
    )
    parser.add_argument("--json", help="report: the JSON to write")
    parser.add_argument("--force", action="store_true", help="report: replace --plot / --json")
    parser.add_argument("--run-dir", help="intervals: the run")
    parser.add_argument("--dataset", help="intervals: the split")
    args = parser.parse_args(argv)
    import gn_det.data  # noqa: F401  (registers the shapes datasets)

    if args.stage == "intervals":
        from gn_det_lab.backbone import checkpoint_intervals

        rows = checkpoint_intervals(
            args.run_dir, args.dataset, resamples=args.resamples, last=args.large_checkpoints
        )
        for row in rows:
            print(json.dumps(row))
        return 0
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.stage in ("pretrain", "finetune") and not os.environ.get(CHILD):
        record_command(args.output_dir, argv)
    if args.stage == "pretrain":
        if len(args.norms) == 1:
            print(json.dumps(pretrain_one(args.norms[0], args)))
            return 0

        def one(norm):  # each norm in its own process, its share of the cores
            threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
            command = [
                sys.executable,
                __file__,
                *(a for a in (argv or sys.argv[1:])),
                "--norms",
                norm,
            ]
            env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **{CHILD: "1"})
            return subprocess.run(
                command, check=True, env=env, capture_output=True, text=True
            ).stdout

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for result in pool.map(one, args.norms):
                print(result.strip())
        return 0
    if args.stage == "finetune":
        if "distill" in args.starts:
            distill_backbone(args)
        factors = {s: args.lr_factors for s in args.starts}
        if args.lr_from_sweep:
            factors = {s: [swept_factor(s, args)] for s in args.starts}
            print(
                f"LR factors from the {args.lr_from_sweep}-iteration sweep: {factors}", flush=True
            )
        jobs = [(s, f, seed) for seed in args.seeds for s in args.starts for f in factors[s]]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for cell in pool.map(lambda job: finetune_one(*job, args), jobs):
                keys = ("start", "batch", "iterations", "lr_factor", "seed", "data")
                print(
                    f"{cell_name(*(cell[k] for k in keys))}: "
                    f"box / mask AP on the validation split {cell.get('box_ap', math.nan):.1f} / "
                    f"{cell.get('mask_ap', math.nan):.1f}",
                    flush=True,
                )
        return 0
    for path in filter(None, (args.plot, args.json)):
        if Path(path).exists() and not args.force:
            print(f"{path} exists: pass --force to replace it", file=sys.stderr)
            return 2
    commands = Path(args.output_dir) / COMMANDS
    ran = commands.read_text().splitlines() if commands.is_file() else []
    made = {
        "command": "; ".join(dict.fromkeys([*ran, command_line(argv)])),
        "machine": f"{os.cpu_count()} CPU cores; one thread per run",
    }
    if args.stage == "paired":
        if not args.lr_from_sweep:
            parser.error("paired needs --lr-from-sweep: the sweep's iterations")
        if args.smoke:
            args.iterations = 2
        result = paired(read_cells(args), args)
        from gn_det_lab.results import markdown_table, write_results

        print(markdown_table(PAIRED_COLUMNS, paired_rows(result)))
        if args.plot:
            plot_paired(result, args.plot, overwrite=True)
        if args.json:
            write_results(
                args.json,
                title=f"{_short(args.pair[1])} against {_short(args.pair[0])}, BN-pretrained "
                "backbone, paired over seeds and test images",
                columns=PAIRED_COLUMNS,
                rows=paired_rows(result),
                data=result,
                **made,
            )
        return 0
    if args.from_json:  # redraw a report's plot from its results file (the runs may be gone)
        rows = json.loads(Path(args.from_json).read_text())["data"]
        pretrain = pretrain_results_path(args.from_json)
        found = json.loads(pretrain.read_text())["data"] if pretrain.is_file() else {}
        pretraining = {norm: (d["result"], d["curve"]) for norm, d in found.items()}
        if args.plot:
            plot(rows, args.plot, overwrite=True, pretraining=pretraining)
        return 0
    rows = summarize(read_cells(args))
    if not rows:
        print(f"no finished cells in {args.output_dir}", file=sys.stderr)
        return 2
    from gn_det_lab.results import markdown_table, write_results

    print(markdown_table(COLUMNS, table_rows(rows)))
    pretraining = read_pretraining(args.output_dir)
    if pretraining:
        print("\n" + markdown_table(PRETRAIN_COLUMNS, pretrain_rows(pretraining)))
    if args.plot:
        plot(rows, args.plot, overwrite=True, pretraining=pretraining)
    if args.json:
        write_results(
            args.json,
            title="The backbone route: fine-tuning at 1 image per batch from each start",
            columns=COLUMNS,
            rows=table_rows(rows),
            data=rows,
            **made,
        )
        if pretraining:  # beside it: <json>_pretrain.json
            write_results(
                pretrain_results_path(args.json),
                title="The backbone route: pretraining on the proxy task",
                columns=PRETRAIN_COLUMNS,
                rows=pretrain_rows(pretraining),
                **made,
                data={
                    norm: {"result": r, "curve": points}
                    for norm, (r, points) in pretraining.items()
                },
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
