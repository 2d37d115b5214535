#!/usr/bin/env python
"""The measured cost of every norm variant of R-50-FPN Mask R-CNN: time, memory, processes.

    lab/tools/benchmark_norms.py --output lab/images/benchmark_norms.png      # ~15 min on 2 cores
    lab/tools/benchmark_norms.py --smoke                                        # tiny (tests)

Four parts, each printed as a markdown table:

1. **Step and inference time.** Every variant built in this process (random weights, the same
   seed), trained on the same batch of 1 and of 2 images (forward + backward + SGD step) and run
   in inference on one image, variants interleaved (the order rotates each round), medians and
   ratios to ``frozenbn_4conv1fc``: FrozenBN with the 4conv1fc box head that the GN model has,
   so the ratio isolates the norm. Images: ``--dataset`` resized to short side ``--size``
   (detectron2's DatasetMapper). LR 1e-4 so that no variant drifts to inf/NaN during the run;
   inference keeps 100 detections per image (score threshold 0) so every variant's mask head
   does the same work.
2. **Peak training memory**, each variant in its own process: growth of peak RSS over the built
   model during two training steps on the 2-image batch (glibc told to return every large
   block, ``MALLOC_MMAP_THRESHOLD_``, so RSS follows live tensors), and the bytes autograd
   keeps for backward at the end of the forward. On CUDA: ``torch.cuda.max_memory_allocated``.
3. **Two processes** (detectron2's ``launch``, gloo on CPU, 1 thread and 1 image each, DDP):
   GN against detectron2's ``naiveSyncBN`` (BN whose statistics are all-reduced across
   processes in every layer), interleaved; median step times and their ratio.
4. **The GN layer against the hardware**: forward + backward of ``F.group_norm`` on the R-50
   stage shapes at this resolution against a same-size tensor copy, as effective bandwidth
   (the minimum traffic, 5 tensor sizes for GN's forward + backward, 2 for a copy).
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from gn_det_lab.memory import MEASURE_ENV, peak_rss_mib, reset_peak_rss, rss_mib
from gn_det_lab.random_weights import SMALL_MODEL_OPTS, normalize_norm_statistics

REFERENCE = "frozenbn_4conv1fc"
_4CONV1FC = [
    "MODEL.ROI_BOX_HEAD.NAME",
    "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_CONV",
    "4",
    "MODEL.ROI_BOX_HEAD.NUM_FC",
    "1",
]
_NAIVE_SYNC = [f"MODEL.{k}.NORM" for k in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")]
# name -> (config: gn_det name, or "zoo:" + a detectron2 model-zoo path; overrides)
VARIANTS = {
    "frozenbn_2fc": ("mask_rcnn_R_50_FPN_frozenbn.yaml", []),
    REFERENCE: ("mask_rcnn_R_50_FPN_frozenbn.yaml", _4CONV1FC),
    "bn": ("mask_rcnn_R_50_FPN_bn.yaml", []),
    "gn": ("gn_mask_rcnn.yaml", []),
    "gn_native": ("zoo:Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", []),
    "gn_recompute": ("gn_mask_rcnn.yaml", ["MODEL.NORM_CONVERSION.RECOMPUTE", "True"]),
    "naive_syncbn": (
        "mask_rcnn_R_50_FPN_bn.yaml",
        [x for k in _NAIVE_SYNC for x in (k, "naiveSyncBN")],
    ),
}
TIMED = [v for v in VARIANTS if v != "naive_syncbn"]  # naiveSyncBN is BN in one process
DISTRIBUTED = ("gn", "naive_syncbn")
# R-50 stages: (channels, stride) of each stage's output, where GN normalises the most bytes.
STAGES = {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("detectron2").setLevel(logging.ERROR)
    logging.getLogger("gn_det").setLevel(logging.ERROR)
    logging.getLogger("fvcore").setLevel(logging.ERROR)


def build_cfg(variant: str, args):
    from detectron2 import model_zoo

    from gn_det.cli.config_files import load_config, resolve_config_name

    name, overrides = VARIANTS[variant]
    path = (
        model_zoo.get_config_file(name[4:])
        if name.startswith("zoo:")
        else resolve_config_name(name)
    )
    cfg = load_config(path)
    cfg.merge_from_list(
        (SMALL_MODEL_OPTS if args.smoke else [])
        + overrides
        + [
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            args.device,
            "SOLVER.BASE_LR",
            "1e-4",
            "INPUT.MIN_SIZE_TRAIN",
            f"({args.size},)",
            "INPUT.MAX_SIZE_TRAIN",
            str(args.max_size),
            "INPUT.MIN_SIZE_TEST",
            str(args.size),
            "INPUT.MAX_SIZE_TEST",
            str(args.max_size),
            "INPUT.RANDOM_FLIP",
            "none",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "0.0",
            "TEST.DETECTIONS_PER_IMAGE",
            "100",
        ]
    )
    return cfg


def build(variant: str, args, batch):
    """(model, optimizer) of a variant: random weights from seed 0, FrozenBN normalised on
    ``batch``, detectron2's optimizer."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    cfg = build_cfg(variant, args)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    normalize_norm_statistics(model, batch)  # FrozenBN from random weights: normalised
    return model, build_optimizer(cfg, model)


def load_batch(args, count: int):
    """``count`` training inputs (images + instances) from ``args.dataset``, mapped as in
    training."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    import gn_det.data  # noqa: F401  (registers the shapes datasets)

    mapper = DatasetMapper(build_cfg(REFERENCE, args), is_train=True)
    return [mapper(d) for d in DatasetCatalog.get(args.dataset)[:count]]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, batch) -> float:
    from detectron2.utils.events import EventStorage

    with EventStorage():  # detectron2's heads log into it
        losses = model(batch)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_variants(args) -> dict:
    """Median seconds of a training step at 1 and 2 images and of inference on 1 image."""
    import torch

    torch.set_flush_denormal(True)
    batch = load_batch(args, 2)
    variants = [v for v in TIMED if v in args.variants]
    built = {v: build(v, args, batch) for v in variants}
    samples = {v: {"step_1": [], "step_2": [], "inference": []} for v in variants}

    def measure(v, record: bool):
        model, optimizer = built[v]
        model.train()
        for n in (1, 2):
            seconds = _timed(lambda: train_step(model, optimizer, batch[:n]), args.device)
            if record:
                samples[v][f"step_{n}"].append(seconds)
        model.eval()
        with torch.no_grad():
            seconds = _timed(lambda: model([{"image": batch[0]["image"]}]), args.device)
        if record:
            samples[v]["inference"].append(seconds)

    for v in variants:  # warm-up: first-call allocations, momentum buffers
        measure(v, record=False)
    for round_ in range(args.repeats):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for v in order:
            measure(v, record=True)
        print(
            f"round {round_ + 1}/{args.repeats}: "
            + ", ".join(f"{v} {samples[v]['step_2'][-1]:.2f} s" for v in variants),
            file=sys.stderr,
            flush=True,
        )
    return {
        v: {k: statistics.median(s) for k, s in samples[v].items()} | {"samples": samples[v]}
        for v in variants
    }


def memory_worker(variant: str, args) -> dict:
    """Peak memory of two training steps on the 2-image batch, in this (fresh) process."""
    import torch

    torch.set_flush_denormal(True)
    batch = load_batch(args, 2)
    model, optimizer = build(variant, args, batch)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    reset_peak_rss()
    base_rss = rss_mib()
    from detectron2.utils.events import EventStorage

    from gn_det_lab.memory import SavedForBackward

    with SavedForBackward(model.parameters()) as saved, EventStorage():
        losses = model(batch)
    saved_bytes = saved.nbytes
    del saved
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    del losses, loss
    train_step(model, optimizer, batch)
    _sync(args.device)
    result = {
        "variant": variant,
        "saved_mib": saved_bytes / 2**20,
        "peak_rss_growth_mib": peak_rss_mib() - base_rss,
    }
    if args.device == "cuda":
        result["cuda_peak_growth_mib"] = torch.cuda.max_memory_allocated() / 2**20 - base
    return result


def memory_variants(args) -> dict:
    """:func:`memory_worker` for each variant, each in its own process."""
    env = {**os.environ, **MEASURE_ENV}
    results = {}
    for v in [v for v in TIMED if v in args.variants]:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", v, *_shared_flags(args)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        results[v] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {v}: {results[v]}", file=sys.stderr, flush=True)
    return results


def _distributed_worker(args, out_path: str) -> None:
    import torch
    from detectron2.utils import comm

    from gn_det.engine import create_ddp_model

    _quiet()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rank = comm.get_rank()
    image = load_batch(args, 2)[rank : rank + 1]  # 1 image per process, a different one each
    built = {}
    for v in DISTRIBUTED:
        model, optimizer = build(v, args, image)
        built[v] = (create_ddp_model(model, broadcast_buffers=False), optimizer)
    samples = {v: [] for v in DISTRIBUTED}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for v in DISTRIBUTED if round_ % 2 else DISTRIBUTED[::-1]:
            comm.synchronize()
            seconds = _timed(lambda: train_step(*built[v], image), args.device)
            if round_:
                samples[v].append(seconds)
    slowest = comm.gather({v: s for v, s in samples.items()}, dst=0)
    if rank == 0:
        # A step ends when the slower process ends it: the per-round maximum over processes.
        per_round = {
            v: [max(r[v][i] for r in slowest) for i in range(args.repeats)] for v in DISTRIBUTED
        }
        with open(out_path, "w") as f:
            json.dump(
                {v: {"step": statistics.median(s), "samples": s} for v, s in per_round.items()}, f
            )


def distributed(args) -> dict:
    from gn_det.cli.train import launch  # gloo for --device cpu even on a GPU host

    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "distributed.json")
        launch(_distributed_worker, 2, device=args.device, dist_url="auto", args=(args, out_path))
        with open(out_path) as f:
            return json.load(f)


def layer_bandwidth(args) -> dict:
    """GN forward+backward and FrozenBN's affine vs a tensor copy, on the R-50 stage shapes."""
    import torch
    import torch.nn.functional as F

    height, width = load_batch(args, 1)[0]["image"].shape[-2:]
    results = {}
    for stage, (channels, stride) in STAGES.items():
        shape = (2, channels, -(-height // stride), -(-width // stride))
        x = torch.randn(shape, device=args.device, requires_grad=True)
        dy = torch.randn(shape, device=args.device)
        weight = torch.ones(channels, device=args.device, requires_grad=True)
        bias = torch.zeros(channels, device=args.device, requires_grad=True)
        scale = torch.rand(1, channels, 1, 1, device=args.device)
        copy_target = torch.empty_like(dy)

        def group_norm():
            F.group_norm(x, 32, weight, bias).backward(dy)

        def frozen_bn():
            (x * scale + scale).backward(dy)

        def copy():
            copy_target.copy_(dy)

        times = {}
        for name, fn in (("copy", copy), ("group_norm", group_norm), ("frozen_bn", frozen_bn)):
            fn()
            times[name] = statistics.median(
                _timed(fn, args.device) for _ in range(args.layer_repeats)
            )
        nbytes = dy.numel() * dy.element_size()
        results[stage] = {
            "shape": list(shape),
            "mib": nbytes / 2**20,
            **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            "copy_gbps": 2 * nbytes / times["copy"] / 1e9,
            "group_norm_gbps": 5 * nbytes / times["group_norm"] / 1e9,
            "frozen_bn_gbps": 4 * nbytes / times["frozen_bn"] / 1e9,
        }
    return results


def profile_step(variant: str, args, rows: int = 12) -> str:
    """torch.profiler's table of one 2-image training step of ``variant`` (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    batch = load_batch(args, 2)
    model, optimizer = build(variant, args, batch)
    train_step(model, optimizer, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, batch)
        _sync(args.device)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    lines = [f"| {variant}: op | self time (s) | share |", "|---|---|---|"]
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:rows]:
        lines.append(
            f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.1%} |"
        )
    return "\n".join(lines)


def _shared_flags(args) -> list:
    return [
        "--size",
        str(args.size),
        "--max-size",
        str(args.max_size),
        "--dataset",
        args.dataset,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        *(["--smoke"] if args.smoke else []),
    ]


def report(results: dict) -> str:
    lines = []
    timing, memory = results.get("timing", {}), results.get("memory", {})
    if timing:
        ref = timing[REFERENCE]
        lines += [
            "| variant | step, 1 image (s) | ratio | step, 2 images (s) | ratio | "
            "inference, 1 image (s) | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for v, t in timing.items():
            lines.append(
                f"| {v} | "
                + " | ".join(
                    f"{t[k]:.2f} | {t[k] / ref[k]:.3f}" for k in ("step_1", "step_2", "inference")
                )
                + " |"
            )
        if "gn" in timing and "gn_native" in timing:
            lines.append(
                f"\nconverted GN / native GN, step at 2 images: "
                f"{timing['gn']['step_2'] / timing['gn_native']['step_2']:.3f}"
            )
    if memory:
        ref = memory[REFERENCE]
        lines += [
            "",
            "| variant | saved for backward (MiB) | ratio | peak RSS growth, 2 steps (MiB) "
            "| ratio |"
            + (" CUDA peak growth (MiB) | ratio |" if "cuda_peak_growth_mib" in ref else ""),
            "|---|---|---|---|---|" + ("---|---|" if "cuda_peak_growth_mib" in ref else ""),
        ]
        for v, m in memory.items():
            keys = ["saved_mib", "peak_rss_growth_mib"] + (
                ["cuda_peak_growth_mib"] if "cuda_peak_growth_mib" in m else []
            )
            lines.append(
                f"| {v} | " + " | ".join(f"{m[k]:.0f} | {m[k] / ref[k]:.3f}" for k in keys) + " |"
            )
    if "distributed" in results:
        d = results["distributed"]
        lines += ["", "| 2 processes, 1 image each | step (s) |", "|---|---|"]
        lines += [f"| {v} | {d[v]['step']:.2f} |" for v in DISTRIBUTED]
        lines.append(
            f"\nnaiveSyncBN / GN step time: {d['naive_syncbn']['step'] / d['gn']['step']:.3f}"
        )
    if "layer" in results:
        lines += [
            "",
            "| stage | shape | MiB | copy (ms) | GN fwd+bwd (ms) | GN / copy time | copy GB/s | "
            "GN effective GB/s | of copy | FrozenBN affine fwd+bwd (ms) |",
            "|---" * 10 + "|",
        ]
        for stage, r in results["layer"].items():
            lines.append(
                f"| {stage} | {'x'.join(map(str, r['shape']))} | {r['mib']:.0f} | "
                f"{r['copy_ms']:.1f} | "
                f"{r['group_norm_ms']:.1f} | {r['group_norm_ms'] / r['copy_ms']:.1f} | "
                f"{r['copy_gbps']:.1f} | {r['group_norm_gbps']:.1f} | "
                f"{r['group_norm_gbps'] / r['copy_gbps']:.2f} | {r['frozen_bn_ms']:.1f} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: str, *, force: bool) -> None:
    from matplotlib.figure import Figure

    from gn_det.visualize import save_figure

    timing, memory = results["timing"], results.get("memory", {})
    variants = list(timing)
    panels = [
        ("step_1", "training step, 1 image"),
        ("step_2", "training step, 2 images"),
        ("inference", "inference, 1 image"),
    ]
    if memory:
        panels.append(("peak_rss_growth_mib", "peak training memory, 2 images"))
    figure = Figure(figsize=(3.2 * len(panels), 3.6), layout="constrained")
    for ax, (key, title) in zip(figure.subplots(1, len(panels)), panels):
        source = memory if key.endswith("mib") else timing
        ref = source[REFERENCE][key]
        values = [source[v][key] / ref for v in variants if v in source]
        ax.barh(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
        ax.set_yticks(range(len(values)), [v for v in variants if v in source], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", linewidth=0.8)
        for i, value in enumerate(values):
            ax.annotate(
                f"{value:.2f}",
                (value, i),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.set_xlim(0, max(values) * 1.2)
        ax.set_title(f"{title}\n(/ {REFERENCE})", fontsize=9)
        ax.tick_params(labelsize=8)
    save_figure(figure, path, overwrite=force)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800, help="short side (default 800)")
    parser.add_argument(
        "--max-size", type=int, default=1333, help="long side at most (default 1333)"
    )
    parser.add_argument(
        "--dataset",
        default="shapes_hr_train",
        help="images (default shapes_hr_train: 1200x1600, so 800x1066 at 800)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--layer-repeats", type=int, default=10)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=TIMED,
        default=TIMED,
        help=f"variants to time and measure ({REFERENCE} is always included)",
    )
    parser.add_argument(
        "--parts",
        nargs="*",
        choices=("timing", "memory", "distributed", "layer"),
        default=["timing", "memory", "distributed", "layer"],
    )
    parser.add_argument(
        "--profile",
        nargs="+",
        choices=TIMED,
        default=[],
        metavar="VARIANT",
        help="also print torch.profiler's top operators of one training step of these variants",
    )
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument(
        "--reuse",
        default=None,
        metavar="JSON",
        help="an earlier run's --json: its results of the parts not run now are "
        "reported with these (e.g. memory, which contention does not change, "
        "measured while other jobs ran)",
    )
    parser.add_argument("--output", default=None, help="PNG of the timing and memory ratios")
    parser.add_argument("--force", action="store_true", help="overwrite --output / --json")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="64-pixel images, 1 round, the models shrunk to R-18 size (tests)",
    )
    parser.add_argument("--memory-worker", choices=TIMED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.max_size, args.dataset = 64, 64, "shapes_train"
        args.repeats, args.layer_repeats = 1, 1
    if args.repeats < 1 or args.layer_repeats < 1:
        parser.error("--repeats and --layer-repeats must be >= 1")
    if REFERENCE not in args.variants:
        args.variants = [REFERENCE, *args.variants]
    for path in [] if args.memory_worker else (args.output, args.json):
        if path and os.path.exists(path) and not args.force:
            parser.error(f"{path} exists; pass --force to overwrite")
    _quiet()
    import gn_det  # noqa: F401  (detectron2's build_model honours MODEL.NORM_CONVERSION)

    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return 0
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{args.dataset} at short side {args.size}",
        flush=True,
    )
    results = {}
    if args.reuse:
        with open(args.reuse) as f:
            results = {k: v for k, v in json.load(f).items() if k not in args.parts}
    if "timing" in args.parts:
        results["timing"] = time_variants(args)
    if "memory" in args.parts:
        results["memory"] = memory_variants(args)
    if "distributed" in args.parts:
        results["distributed"] = distributed(args)
    if "layer" in args.parts:
        results["layer"] = layer_bandwidth(args)
    print(report(results))
    for variant in args.profile:
        print("\n" + profile_step(variant, args), flush=True)
    if args.json:
        from gn_det.visualize import write_atomic

        write_atomic(
            args.json,
            lambda f: f.write(json.dumps(results, indent=1).encode()),
            overwrite=args.force,
        )
    if args.output and "timing" in results:
        plot(results, args.output, force=args.force)
        print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
