#!/usr/bin/env python
"""Train with GN, deploy without its cost: what folding GroupNorm keeps of AP and saves of time.

    lab/tools/fold_study.py accuracy --run output/demo --json output/fold/demo.json
    lab/tools/fold_study.py timing --json output/fold/timing.json --repeats 5
    lab/tools/fold_study.py report output/fold/demo.json --timing output/fold/timing.json \\
        --plot lab/images/folding.png --results lab/results/folding
    lab/tools/fold_study.py report --from-results lab/results/folding --plot lab/images/folding.png
    lab/tools/fold_study.py accuracy --smoke ...; timing --smoke      # seconds (tests)

**accuracy**: a trained GN run (its ``config.yaml`` and ``model_final.pth``), folded for each
plan of :data:`PLANS`, stage by stage (``gn_det_lab.folding``: the steps of
``gn_det.folding.fold_for_inference`` taken apart): the GN model as trained; each GN a
fixed affine from its input statistics over ``--images`` training images; then
``--distill-steps`` of distillation against the GN model; then those affines folded into the
convolutions (the deployed model, ``gn_det_lab.folding.fold_affines``). Each is evaluated on
the large held-out split with 95 % bootstrap intervals over images
(``gn_det_lab.bootstrap``); distillation is timed.

**timing**: inference time per image in one process, variants interleaved (the order rotates
each round), medians and ratios to FrozenBN folded into its convolutions: of
``gn_mask_rcnn.yaml``'s R-50-FPN Mask R-CNN at 1333x800 (random weights; FrozenBN with the same
4conv1fc box head) and of the shapes model at 256x256: GN, GN folded, and the partial plans;
and GroupNorm's share of a GN inference in ``torch.profiler``.
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

#: plan -> module-name prefixes whose GroupNorm stays GroupNorm.
FPN = tuple(
    f"backbone.fpn_{kind}{level}" for kind in ("lateral", "output") for level in (2, 3, 4, 5)
)
PLANS = {
    "all folded": (),
    "ROI heads keep GN": ("roi_heads",),
    "FPN and ROI heads keep GN": ("roi_heads", *FPN),
}


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("detectron2", "fvcore", "gn_det", "d2"):
        logging.getLogger(name).setLevel(logging.ERROR)


def accuracy(args) -> dict:
    import torch

    from gn_det import load_images
    from gn_det_lab.backbone import evaluate_intervals
    from gn_det_lab.bn_statistics import load_run
    from gn_det_lab.folding import affine_stage, fold_affines, kept_as_gn, layer_counts

    cfg, model = load_run(args.run)
    if args.smoke:
        cfg.defrost()
        cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST = 64
    dataset = args.dataset
    images = load_images(cfg, cfg.DATASETS.TRAIN[0], args.images)
    rows = [
        {
            "plan": "GN (as trained)",
            "stage": "GN",
            "seconds": 0.0,
            **evaluate_intervals(cfg, model, dataset, args.resamples),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    for plan in args.plans:
        exclude = PLANS[plan]
        for stage, steps in (
            ("affine from statistics", 0),
            (f"+ distill {args.distill_steps}", args.distill_steps),
        ):
            torch.manual_seed(0)
            start = time.perf_counter()
            student, outcome = affine_stage(
                model, images, exclude=exclude, distill_steps=steps, batch_size=args.batch_size
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "plan": plan,
                    "stage": stage,
                    "seconds": seconds,
                    "layers": layer_counts(outcome),
                    **evaluate_intervals(cfg, student, dataset, args.resamples),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        # The deployed model: the distilled affines folded into their convolutions.
        start = time.perf_counter()
        outcome = fold_affines(student)
        seconds += time.perf_counter() - start
        rows.append(
            {
                "plan": plan,
                "stage": "+ fold (deployed)",
                "seconds": seconds,
                "layers": layer_counts({**outcome, **kept_as_gn(student)}),
                **evaluate_intervals(cfg, student, dataset, args.resamples),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {
        "run": str(args.run),
        "dataset": dataset,
        "images": args.images,
        "distill_steps": args.distill_steps,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _variants(args):
    """name -> (model in eval mode, its input image), built and folded here."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    from gn_det.cli.config_files import load_config, resolve_config_name
    from gn_det.folding import fold_for_inference
    from gn_det_lab.folding import fold_frozen_batchnorm
    from gn_det_lab.random_weights import SMALL_MODEL_OPTS, normalize_norm_statistics

    def built(config, *extra):
        cfg = load_config(resolve_config_name(config))
        small = (
            SMALL_MODEL_OPTS if args.smoke and not config.startswith("shapes/") else []
        )  # R-50 at R-18 size
        cfg.merge_from_list(
            [
                *small,
                "MODEL.WEIGHTS",
                "",
                "MODEL.DEVICE",
                "cpu",
                "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
                "0.0",
                "TEST.DETECTIONS_PER_IMAGE",
                "100",
                *extra,
            ]
        )
        torch.manual_seed(0)
        return build_model(cfg).eval()

    found = {}
    for scale, (config_gn, config_frozen, size) in {
        "R-50-FPN 1333x800": ("gn_mask_rcnn.yaml", "mask_rcnn_R_50_FPN_frozenbn.yaml", (800, 1333)),
        "shapes R-18-FPN 256x256": ("shapes/gn.yaml", "shapes/frozenbn.yaml", (256, 256)),
    }.items():
        if args.smoke:
            size = (64, 96)
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)) * 255
        head = (
            ["MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.NUM_FC", "1"]
            if "R-50" in scale
            else []
        )
        frozen = built(config_frozen, *head)
        normalize_norm_statistics(frozen, [{"image": image}], (FrozenBatchNorm2d,))
        fold_frozen_batchnorm(frozen)
        found[(scale, "FrozenBN folded")] = (frozen, image)
        gn = built(config_gn)
        found[(scale, "GN")] = (gn, image)
        for plan, exclude in PLANS.items():
            folded, _ = fold_for_inference(
                gn, [{"image": image}], exclude=exclude, distill_steps=0, progress=False
            )
            found[(scale, f"GN, {plan}")] = (folded, image)
    return found


def timing(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_flush_denormal(True)  # as benchmark_norms: no variant pays for denormal floats
    variants = _variants(args)
    samples = {key: [] for key in variants}
    keys = list(variants)
    with torch.no_grad():
        for model, image in variants.values():  # warm-up
            model([{"image": image}])
        for round_ in range(args.repeats):
            for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
                model, image = variants[key]
                start = time.perf_counter()
                model([{"image": image}])
                samples[key].append(time.perf_counter() - start)
            print(f"round {round_ + 1}/{args.repeats}", file=sys.stderr, flush=True)
        shares = {}
        for scale in {s for s, _ in keys}:
            model, image = variants[(scale, "GN")]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model([{"image": image}])
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            group_norm = sum(e.self_cpu_time_total for e in events if "group_norm" in e.key)
            shares[scale] = group_norm / total
    rows = []
    for scale in dict.fromkeys(s for s, _ in keys):
        reference = statistics.median(samples[(scale, "FrozenBN folded")])
        for (s, name), values in samples.items():
            if s == scale:
                rows.append(
                    {
                        "model": scale,
                        "variant": name,
                        "seconds": statistics.median(values),
                        "ratio": statistics.median(values) / reference,
                        "round_ratios": [
                            v / r for v, r in zip(values, samples[(scale, "FrozenBN folded")])
                        ],
                        "samples": values,
                    }
                )
    return {
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "rows": rows,
        "group_norm_share": shares,
    }


ACCURACY_COLUMNS = [
    "model",
    "plan",
    "stage",
    "box AP [95 % interval]",
    "mask AP [95 % interval]",
    "of GN's box / mask",
    "seconds",
]
TIMING_COLUMNS = [
    "model",
    "variant",
    "inference per image (s)",
    "/ FrozenBN folded (medians)",
    "per round: median [interquartile range]",
]


def accuracy_rows(run: dict) -> list:
    """The accuracy table's cells for one run, as the Markdown table prints them."""
    gn = run["rows"][0]
    name = f"{Path(run['run']).name} ({run['dataset']})"
    out = []
    for row in run["rows"]:
        cells = [
            f"{row[k]['ap']:.1f} [{row[k]['low']:.1f}, {row[k]['high']:.1f}]"
            for k in ("box", "mask")
        ]
        kept = " / ".join(
            f"{row[k]['ap'] / gn[k]['ap']:.1%}" if gn[k]["ap"] > 0 else "—" for k in ("box", "mask")
        )
        out.append([name, row["plan"], row["stage"], *cells, kept, f"{row['seconds']:.0f}"])
    return out


def timing_rows(timing_data: dict) -> list:
    """The ratio of the medians, and the round-by-round ratios (each round times every variant
    once, in rotating order), which pair the variants on the machine's state at that moment."""

    def per_round(ratios):
        if len(ratios) < 2:
            return f"{ratios[0]:.3f} (one round)"
        low, median, high = per_round_quartiles(ratios)
        return f"{median:.3f} [{low:.3f}, {high:.3f}]"

    return [
        [
            r["model"],
            r["variant"],
            f"{r['seconds']:.3f}",
            f"{r['ratio']:.3f}",
            per_round(r["round_ratios"]),
        ]
        for r in timing_data["rows"]
    ]


def report(args) -> int:
    """Tables (printed), the plot, and lab/tools/render_results.py's files
    ``<results>_accuracy.json`` and ``<results>_timing.json`` (title, command, machine, columns,
    rows, and the data)."""
    import os

    from gn_det_lab.results import markdown_table, write_results

    if args.from_results:  # the committed results files hold the data the report drew from
        if args.inputs or args.timing or args.results:
            print(
                "--from-results replaces the accuracy JSONs, --timing and --results",
                file=sys.stderr,
            )
            return 2
        prefix = args.from_results
        runs = json.loads(Path(f"{prefix}_accuracy.json").read_text())["data"]
        timing_data = json.loads(Path(f"{prefix}_timing.json").read_text())["data"]
    else:
        runs = [json.loads(Path(p).read_text()) for p in args.inputs]
        timing_data = json.loads(Path(args.timing).read_text()) if args.timing else None
    accuracy_table = [row for run in runs for row in accuracy_rows(run)]
    lines = [markdown_table(ACCURACY_COLUMNS, accuracy_table), ""] if runs else []
    if timing_data:
        lines.append(markdown_table(TIMING_COLUMNS, timing_rows(timing_data)))
        lines += [
            "",
            "GroupNorm's share of a GN inference (torch.profiler, self CPU time): "
            + ", ".join(f"{k} {v:.1%}" for k, v in timing_data["group_norm_share"].items()),
        ]
    print("\n".join(lines))
    outputs = [args.plot] if args.plot else []
    if args.results:
        outputs += [f"{args.results}_accuracy.json", f"{args.results}_timing.json"]
    for path in outputs:
        if Path(path).exists() and not args.force:
            print(f"{path} exists: pass --force to replace it", file=sys.stderr)
            return 2
    if args.plot and runs and timing_data:
        _plot(runs, timing_data, args.plot)
    if args.results:
        machine = f"{os.cpu_count()} CPU cores, torch {__import__('torch').__version__}"
        commands = args.commands or "lab/tools/fold_study.py " + " ".join(sys.argv[1:])
        write_results(
            f"{args.results}_accuracy.json",
            title="Folding GN for inference: AP stage by stage and plan by plan",
            command=commands,
            machine=machine,
            columns=ACCURACY_COLUMNS,
            rows=accuracy_table,
            data=runs,
        )
        write_results(
            f"{args.results}_timing.json",
            title="Folding GN for inference: inference time per image, / FrozenBN folded",
            command=commands,
            machine=machine,
            columns=TIMING_COLUMNS,
            rows=timing_rows(timing_data) if timing_data else [],
            data=timing_data,
        )
    return 0


#: How the plot names the models of the accuracy JSONs (their run folders); others by folder.
MODEL_NAMES = {
    "demo": "demo (GN from scratch, 2 images per batch)",
    "gn_pretrained_b1_i3600_lr1x_s1": "GN-pretrained, fine-tuned at 1 image per batch",
}
#: Where a plan's name sits from its point (points), so that close plans do not collide.
PLAN_OFFSETS = {
    "GN": (-6, 6),
    "all folded": (6, 6),
    "ROI heads keep GN": (6, -11),
    "FPN and ROI heads keep GN": (-6, 6),
}


def per_round_quartiles(ratios) -> tuple:
    """(first quartile, median, third quartile) of the round-by-round ratios, as the timing table
    prints them; one round gives its ratio three times."""
    if len(ratios) < 2:
        return (ratios[0],) * 3
    return tuple(statistics.quantiles(ratios, n=4))


def figure(runs: list, timing_data: dict):
    """Box and mask AP of each model's deployed plans (95 % intervals) against the plan's
    inference time / FrozenBN folded, round by round: median and interquartile range. One colour
    and marker per model, the same in both panels; each plan named beside its point."""
    from matplotlib.figure import Figure

    # A plan's time is a property of the architecture: measured where GN's cost shows (R-50-FPN
    # at 1333x800; on the small shapes model every variant is within the rounds' noise).
    scale = next(r["model"] for r in timing_data["rows"] if "R-50" in r["model"])
    quartiles = {
        r["variant"]: per_round_quartiles(r["round_ratios"])
        for r in timing_data["rows"]
        if r["model"] == scale
    }
    rounds = max(len(r["round_ratios"]) for r in timing_data["rows"])
    result = Figure(figsize=(10, 4.2), layout="constrained")
    axes = result.subplots(1, 2)
    for ax, kind in zip(axes, ("box", "mask")):
        for k, run in enumerate(runs):
            model = Path(run["run"]).name
            points = []
            for row in run["rows"]:
                if row["stage"] not in ("GN", "+ fold (deployed)"):
                    continue
                plan = "GN" if row["stage"] == "GN" else row["plan"]
                low, x, high = quartiles.get("GN" if plan == "GN" else f"GN, {plan}", (None,) * 3)
                if x is not None:
                    points.append((plan, x, low, high, row[kind]))
            if not points:
                continue
            ax.errorbar(
                [p[1] for p in points],
                [p[4]["ap"] for p in points],
                xerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
                yerr=[
                    [p[4]["ap"] - p[4]["low"] for p in points],
                    [p[4]["high"] - p[4]["ap"] for p in points],
                ],
                fmt="os^D"[k % 4],
                color=f"C{k}",
                capsize=3,
                linewidth=1,
                label=MODEL_NAMES.get(model, model),
            )
            for plan, x, _, _, ap in points:
                dx, dy = PLAN_OFFSETS.get(plan, (6, 6))
                ax.annotate(
                    f"{plan}: {ap['ap']:.1f}",
                    (x, ap["ap"]),
                    xytext=(dx, dy),
                    textcoords="offset points",
                    ha="left" if dx > 0 else "right",
                    fontsize=7,
                    color=f"C{k}",
                )
        ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(
            f"inference time / FrozenBN folded ({scale}, CPU):\n"
            f"median of the {rounds} rounds' ratios, bars: interquartile range"
        )
        ax.set_ylabel(f"{kind} AP on {runs[0]['dataset']}, 95 % interval")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.08)
    result.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=2)
    return result


def _plot(runs: list, timing_data: dict, path: str) -> None:
    from gn_det.visualize import save_figure

    save_figure(figure(runs, timing_data), path, overwrite=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=("accuracy", "timing", "report"))
    parser.add_argument("inputs", nargs="*", metavar="ACCURACY_JSON", help="report: accuracy JSONs")
    parser.add_argument("--run", help="accuracy: a trained GN run's folder")
    parser.add_argument("--dataset", default="shapes_large_test")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="accuracy / timing: where to write the results")
    parser.add_argument("--timing", help="report: the timing JSON")
    parser.add_argument("--plot", help="report: the PNG (AP against inference time)")
    parser.add_argument(
        "--results",
        help="report: PREFIX of the results files PREFIX_accuracy.json and "
        "PREFIX_timing.json (lab/tools/render_results.py's format)",
    )
    parser.add_argument(
        "--commands", help="report: the commands that made the inputs, recorded in --results"
    )
    parser.add_argument(
        "--from-results",
        metavar="PREFIX",
        help="report: read the runs and the timing from PREFIX_accuracy.json and "
        "PREFIX_timing.json (lab/results/folding: print the tables, redraw --plot)",
    )
    parser.add_argument("--force", action="store_true", help="report: replace --plot / --results")
    parser.add_argument("--smoke", action="store_true", help="tiny everything (tests)")
    args = parser.parse_args(argv)
    _quiet()
    import gn_det.data  # noqa: F401  (registers the shapes datasets)

    if args.stage == "report":
        return report(args)
    if args.smoke:
        args.images, args.distill_steps, args.resamples, args.repeats = 2, 1, 10, 1
    result = accuracy(args) if args.stage == "accuracy" else timing(args)
    if args.json:
        from gn_det.checkpoint.io import write_text_atomically

        write_text_atomically(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
