#!/usr/bin/env python
"""GN + Weight Standardization against GN: the paired comparison from scratch, and the
zero-shot transfer of BN weights to each (lab/benchmarks.md, "GN + Weight Standardization").

    # the runs: the demo recipe with each config, seeds paired, one thread each
    lab/tools/small_batch_study.py --output-dir output/ws --norms gn gn_ws --batches 2 \\
        --seeds 1 2 --eval-period 360 --jobs 2
    lab/tools/ws_study.py intervals output/ws/*_s1          # while later seeds train (cached)
    lab/tools/ws_study.py paired --output-dir output/ws --batch 2 \\
        --json lab/results/ws_paired.json --plot lab/images/ws_paired.png
    # zero-shot: a BN-trained source converted to GN and to GN+WS, evaluated untrained
    lab/tools/ws_study.py zero-shot --source output/ws_bn_source/model_final.pth \\
        --output-dir output/ws_zero_shot --json lab/results/ws_zero_shot.json
    lab/tools/ws_study.py ... --smoke                       # seconds (tests)

**paired** reads each finished run ``<norm>_b<batch>_*_s<seed>`` of ``--output-dir``, evaluates
its last two checkpoints (90 % and 100 % of the schedule) on ``shapes_large_test`` with
bootstrap resamples over its 500 images (``gn_det_lab.backbone.checkpoint_intervals``, cached in
the run), and takes the paired difference GN+WS − GN over seeds and image resamples
(``gn_det_lab.bootstrap.paired_difference``). **zero-shot** runs
``gn_det_lab.transfer.detector_zero_shot`` with ``shapes/gn.yaml`` and with
``shapes/gn_ws.yaml`` as the student: ``copy``, ``stats``, ``calibrate 32`` and
``calibrate 32 + distill 100``, each evaluated on ``shapes_val`` and compared with the BN source
by the cosine of each FPN level.
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import math
import os
import re
import statistics
import sys
from pathlib import Path

NORMS = {"gn": "GN", "gn_ws": "GN+WS"}
LARGE = "shapes_large_test"
KINDS = ("box", "mask")


def _command(argv) -> str:
    return "lab/tools/ws_study.py " + " ".join(argv if argv is not None else sys.argv[1:])


def runs_of(output_dir: str, norm: str, batch: int) -> dict:
    """``{seed: run_dir}`` of the finished runs of ``norm`` at ``batch`` images per batch."""
    from gn_det_lab.runs import finished_run

    found = {}
    for run_dir in Path(output_dir).glob(f"{norm}_b{batch}_*_s*"):
        match = re.fullmatch(rf"{norm}_b{batch}_lr[^_]+(_sqrt)?_s(\d+)", run_dir.name)
        if match and finished_run(run_dir) is not None:
            found[int(match.group(2))] = run_dir
    return dict(sorted(found.items()))


def run_result(run_dir: Path, resamples: int, dataset: str = LARGE) -> dict:
    """A run's last two checkpoints on ``dataset`` and its validation curve."""
    from gn_det_lab.backbone import checkpoint_intervals
    from gn_det_lab.runs import evaluations, finished_run

    before, final = checkpoint_intervals(run_dir, dataset, resamples=resamples, last=2)
    return {
        "run_dir": str(run_dir),
        "final": {k: final[k] for k in KINDS},
        "before": {k: before[k] for k in KINDS},
        "before_iteration": before["iteration"],
        "iteration": final["iteration"],
        "val_curve": evaluations(run_dir, "shapes_val"),
        "minutes": finished_run(run_dir)["seconds"] / 60,
    }


def paired(args) -> dict:
    from gn_det_lab.bootstrap import paired_difference

    runs = {norm: runs_of(args.output_dir, norm, args.batch) for norm in NORMS}
    seeds = sorted(set(runs["gn"]) & set(runs["gn_ws"]))
    if not seeds:
        raise SystemExit(f"no seed has finished runs of both norms in {args.output_dir}")
    result = {"batch": args.batch, "seeds": seeds, "dataset": args.dataset, "norms": {}}
    for norm in NORMS:
        result["norms"][norm] = {s: run_result(runs[norm][s], args.resamples, args.dataset)
                                 for s in seeds}
    a, b = result["norms"]["gn"], result["norms"]["gn_ws"]
    result["curve_seeds"] = args.curve_seeds or seeds
    result["curve_note"] = args.curve_note
    result["difference"] = {
        kind: paired_difference(
            {s: (a[s]["final"][kind]["ap"], a[s]["final"][kind]["samples"]) for s in seeds},
            {s: (b[s]["final"][kind]["ap"], b[s]["final"][kind]["samples"]) for s in seeds},
        )
        for kind in KINDS
    }
    return result


def _gain(run: dict, kind: str) -> float:
    return run["final"][kind]["ap"] - run["before"][kind]["ap"]


def paired_rows(result: dict) -> list:
    rows = []
    for norm, label in NORMS.items():
        runs = result["norms"][norm].values()
        mean = {k: statistics.mean(r["final"][k]["ap"] for r in runs) for k in KINDS}
        gain = {k: statistics.mean(_gain(r, k) for r in runs) for k in KINDS}
        rows.append([
            label,
            *(" / ".join(f"{r['final'][k]['ap']:.1f}" for r in runs) for k in KINDS),
            f"{mean['box']:.1f} / {mean['mask']:.1f}",
            f"{gain['box']:+.1f} / {gain['mask']:+.1f}",
            f"{statistics.mean(r['minutes'] for r in runs):.0f}",
        ])
    d = result["difference"]
    rows.append([
        "difference, paired: GN+WS − GN",
        *(" / ".join(f"{v:+.1f}" for v in d[k]["per_seed"].values()) for k in KINDS),
        " / ".join(f"{d[k]['difference']:+.1f} [{d[k]['low']:+.1f}, {d[k]['high']:+.1f}]"
                   for k in KINDS),
        "", "",
    ])
    return rows


PAIRED_COLUMNS = ["model", "box AP per seed", "mask AP per seed",
                  "box / mask AP (mean; difference: 95 % interval)",
                  "last 10 % of the schedule: gain (box / mask)", "minutes per run"]


def plot_paired(result: dict, path: str, *, overwrite: bool) -> None:
    """Three panels: each seed's final AP, the paired difference with its interval, the
    validation curves."""
    from matplotlib.figure import Figure

    from gn_det.visualize import save_figure

    figure = Figure(figsize=(13, 4), layout="constrained")
    seeds_ax, diff_ax, curve_ax = figure.subplots(1, 3)
    for i, (norm, label) in enumerate(NORMS.items()):
        colour = f"C{i}"
        runs = result["norms"][norm]
        for j, kind in enumerate(KINDS):
            x = j + (0.15 if i else -0.15)
            values = [r["final"][kind]["ap"] for r in runs.values()]
            seeds_ax.plot([x] * len(values), values, "o", color=colour, alpha=0.7,
                          label=label if j == 0 else None)
            seeds_ax.plot([x - 0.08, x + 0.08], [statistics.mean(values)] * 2, color=colour)
        for seed, run in runs.items():
            curve = run["val_curve"]
            if result.get("curve_seeds") and seed not in result["curve_seeds"]:
                continue
            curve_ax.plot([e["iteration"] for e in curve], [e["box_ap"] for e in curve],
                          color=colour, linewidth=1, alpha=0.8,
                          label=label if seed == min(result.get("curve_seeds") or runs)
                          else None)
    seeds_ax.set_xticks([0, 1], ["box AP", "mask AP"])
    seeds_ax.set_title(f"each seed's final AP on {result['dataset']} (bars: means)", fontsize=10)
    seeds_ax.legend(fontsize=8)
    for j, kind in enumerate(KINDS):
        d = result["difference"][kind]
        diff_ax.errorbar([j], [d["difference"]], yerr=[[d["difference"] - d["low"]],
                                                        [d["high"] - d["difference"]]],
                         fmt="o", color="k", capsize=6)
        diff_ax.plot([j] * len(d["per_seed"]), list(d["per_seed"].values()), "x", color="C3",
                     label="per seed" if j == 0 else None)
    diff_ax.axhline(0, color="0.5", linewidth=1)
    diff_ax.set_xticks([0, 1], ["box AP", "mask AP"])
    diff_ax.set_xlim(-0.6, 1.6)
    diff_ax.set_title("GN+WS − GN, paired (95 % interval)", fontsize=10)
    diff_ax.legend(fontsize=8)
    curve_ax.set_xlabel(f"iterations at {result['batch']} images per batch")
    curve_ax.set_ylabel("box AP, shapes_val (50 images)")
    seeds = result.get("curve_seeds") or result["seeds"]
    curve_ax.set_title(f"validation curves, seed{'s' * (len(seeds) > 1)} "
                       f"{', '.join(map(str, seeds))}", fontsize=10)
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=8)
    save_figure(figure, path, overwrite=overwrite)


def removed_share(source: str, images: int) -> dict:
    """Per conv + BN pair of a BN-trained shapes model (``shapes/bn.yaml`` + ``source``): the
    share of the conv output's variance around each channel's mean, over ``images`` validation
    images, that the weight mean WS removes carries, ``var(m_c S) / var(z_c)`` averaged over
    channels (docs/transfer.md: ``ẑ_c = (z_c − m_c S) / s_c``)."""
    import torch
    import torch.nn.functional as F
    from detectron2.layers import Conv2d
    from detectron2.modeling import build_model

    from gn_det import load_images
    from gn_det.checkpoint import Checkpointer
    from gn_det.cli.config_files import load_config, resolve_config_name

    cfg = load_config(resolve_config_name("shapes/bn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    Checkpointer(model).load_weights(source)
    sums = {}

    def hook(conv, args, name):
        w = conv.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True).expand_as(w)
        z, r = (F.conv2d(args[0], k, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                for k in (w, mean))
        share = r.var(dim=(0, 2, 3)) / z.var(dim=(0, 2, 3)).clamp_min(1e-12)
        sums.setdefault(name, []).append(share.mean().item())

    handles = [m.register_forward_pre_hook(lambda m, a, name=n: hook(m, a, name))
               for n, m in model.named_modules() if isinstance(m, Conv2d) and m.norm is not None]
    with torch.no_grad():
        model(load_images(cfg, "shapes_val", images))
    for h in handles:
        h.remove()
    shares = {name: statistics.mean(v) for name, v in sums.items()}
    values = sorted(shares.values())
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"per_layer": shares, "median": median, "q1": q1, "q3": q3, "min": values[0],
            "max": values[-1], "images": images}


ZERO_SHOT_METHODS = ("copy", "stats", "calibrate 32", "calibrate 32 + distill 100")


def zero_shot(args) -> dict:
    from gn_det_lab.runs import SMOKE_OPTS
    from gn_det_lab.transfer import detector_zero_shot

    count = 2 if args.smoke else 32
    steps = 2 if args.smoke else 100
    keep = {m.replace("32", str(count)).replace("100", str(steps)) for m in ZERO_SHOT_METHODS}
    result = {}
    for norm in NORMS:
        rows = detector_zero_shot(
            args.source, os.path.join(args.output_dir, norm),
            student_config=f"shapes/{norm}.yaml", calibration_counts=(count,),
            distill_steps=(steps,), distill_images=count, cosine_images=2 if args.smoke else 16,
            opts=SMOKE_OPTS if args.smoke else (), methods=sorted(keep))
        result[norm] = [vars(r) for r in rows]
    return result


def zero_shot_rows(result: dict) -> list:
    teacher = result["gn"][0]
    rows = [["BN source", f"{teacher['box_ap']:.1f} / {teacher['mask_ap']:.1f}", "", "", ""]]
    by_method = {norm: {r["method"]: r for r in rows_[1:]} for norm, rows_ in result.items()}
    for method in by_method["gn"]:
        cells = [method]
        for norm in NORMS:
            r = by_method[norm][method]
            kept = r["box_ap"] / teacher["box_ap"] if teacher["box_ap"] else math.nan
            cosines = list(r["cosines"].values())
            cells += [f"{r['box_ap']:.1f} / {r['mask_ap']:.1f} ({kept:.0%})",
                      f"{min(cosines):.3f}–{max(cosines):.3f}"]
        rows.append(cells)
    return rows


ZERO_SHOT_COLUMNS = ["transfer", "GN: box / mask AP (box kept)", "GN: cosine, FPN levels",
                     "GN+WS: box / mask AP (box kept)", "GN+WS: cosine, FPN levels"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    intervals = sub.add_parser("intervals", help="evaluate finished runs' last two checkpoints "
                               f"on {LARGE} (cached in each run)")
    intervals.add_argument("runs", nargs="+")
    pair = sub.add_parser("paired", help="the paired difference GN+WS − GN")
    pair.add_argument("--output-dir", default="output/ws")
    pair.add_argument("--batch", type=int, default=2)
    pair.add_argument("--plot", default=None)
    pair.add_argument("--curve-seeds", type=int, nargs="+", default=None,
                      help="the seeds whose validation curves to draw (default all)")
    pair.add_argument("--curve-note", default="", help="why, kept in the results file")
    zero = sub.add_parser("zero-shot", help="a BN source converted to GN and GN+WS, untrained")
    zero.add_argument("--source", required=True, help="the BN-trained shapes model (.pth)")
    zero.add_argument("--output-dir", default="output/ws_zero_shot")
    removed = sub.add_parser("removed", help="what the weight mean WS removes carries, per layer "
                             "of a BN-trained model")
    removed.add_argument("--source", required=True, help="the BN-trained shapes model (.pth)")
    removed.add_argument("--images", type=int, default=16)
    for p in (intervals, pair):
        p.add_argument("--dataset", default=LARGE, help=f"where the finals are evaluated "
                       f"(default {LARGE})")
    for p in (intervals, pair, zero, removed):
        p.add_argument("--resamples", type=int, default=200)
        p.add_argument("--json", default=None, help="results file to write")
        p.add_argument("--force", action="store_true", help="overwrite --plot")
        p.add_argument("--smoke", action="store_true", help="tiny settings (tests)")
    args = parser.parse_args(argv)

    import gn_det  # noqa: F401  (registers the shapes datasets and the configs' parts)
    from gn_det_lab.results import markdown_table, write_results

    machine = f"{os.cpu_count()} CPU cores"
    if args.stage == "intervals":
        for run in args.runs:
            run_result(Path(run), args.resamples, args.dataset)
            print(f"evaluated {run}")
        return 0
    if args.stage == "removed":
        result = removed_share(args.source, args.images)
        columns = ["conv + BN pairs", "share of the conv output's variance: median [IQR]",
                   "min – max"]
        rows = [[str(len(result["per_layer"])),
                 f"{result['median']:.3f} [{result['q1']:.3f}, {result['q3']:.3f}]",
                 f"{result['min']:.3f} – {result['max']:.3f}"]]
        title = (f"What the weight mean that WS removes carries in a BN-trained model "
                 f"({args.images} shapes_val images)")
    elif args.stage == "paired":
        result = paired(args)
        columns, rows = PAIRED_COLUMNS, paired_rows(result)
        title = (f"GN+WS against GN from scratch, demo recipe at {args.batch} images per batch, "
                 f"paired over seeds {result['seeds']} on {args.dataset}")
        if args.plot:
            plot_paired(result, args.plot, overwrite=args.force)
    else:
        result = zero_shot(args)
        columns, rows = ZERO_SHOT_COLUMNS, zero_shot_rows(result)
        title = "BN weights converted to GN and to GN+WS, zero-shot (no training), shapes_val"
    print(markdown_table(columns, rows))
    if args.json:
        write_results(args.json, title=title, command=_command(argv), machine=machine,
                      columns=columns, rows=rows, data=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
