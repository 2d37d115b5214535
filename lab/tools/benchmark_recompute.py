#!/usr/bin/env python
"""Memory and time of conv + GN recompute (MODEL.NORM_CONVERSION.RECOMPUTE) on a GN backbone + FPN.

    lab/tools/benchmark_recompute.py --config gn_mask_rcnn.yaml --size 800 --batch 2 --repeats 3

Each measurement is one training forward + backward of the config's backbone + FPN (randomly
initialised, FREEZE_AT as configured) under a deterministic loss, in a fresh process, so that
peak RSS belongs to that variant alone. Variants alternate (off, on, off, on, ...) and medians
and on/off ratios are reported. "saved" is what autograd holds for backward when the forward
ends (distinct storages, parameters excluded); "peak RSS" is the process's peak during the
step over its RSS before it (``gn_det_lab.memory``: the kernel's high-water mark, reset
before the step; workers run with ``MALLOC_MMAP_THRESHOLD_`` so RSS follows live tensors).
"""

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from gn_det_lab.memory import MEASURE_ENV, peak_rss_mib, reset_peak_rss, rss_mib

VARIANTS = ("off", "on")


def measure(config: str, size: int, batch: int, recompute: bool, threads: int) -> dict:
    """One forward + backward in this process; returns time, saved bytes and RSS growth."""
    import torch
    from detectron2.modeling import build_backbone

    from gn_det.config import convert_model_by_config
    from gn_det.cli.config_files import load_config, resolve_config_name
    from gn_det_lab.memory import SavedForBackward

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(resolve_config_name(config))
    cfg.MODEL.NORM_CONVERSION.RECOMPUTE = recompute
    torch.manual_seed(0)
    model = convert_model_by_config(build_backbone(cfg), cfg).train()
    images = torch.randn(batch, 3, size, size)
    reset_peak_rss()
    base_rss = rss_mib()
    start = time.perf_counter()
    with SavedForBackward(model.parameters()) as saved:
        features = model(images)
    forward_s = time.perf_counter() - start
    saved_bytes = saved.nbytes
    loss = sum((f**2).mean() + f.mean() for f in features.values())
    loss.backward()
    step_s = time.perf_counter() - start
    peak_rss = peak_rss_mib()
    return {
        "recompute": recompute,
        "forward_s": forward_s,
        "step_s": step_s,
        "saved_mib": saved_bytes / 2**20,
        "peak_rss_growth_mib": peak_rss - base_rss,
        "loss": loss.item(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gn_mask_rcnn.yaml")
    parser.add_argument("--size", type=int, default=800, help="square image side, pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = measure(args.config, args.size, args.batch, args.worker == "on", args.threads)
        print(json.dumps(result))
        return 0

    results = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    variant,
                    "--config",
                    args.config,
                    "--size",
                    str(args.size),
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **MEASURE_ENV},
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results[variant].append(result)
            print(
                f"[{repeat + 1}/{args.repeats}] recompute {variant}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)),
                flush=True,
            )

    keys = ("forward_s", "step_s", "saved_mib", "peak_rss_growth_mib")
    median = {v: {k: statistics.median(r[k] for r in results[v]) for k in keys} for v in VARIANTS}
    losses = {v: results[v][0]["loss"] for v in VARIANTS}
    print(
        f"\n{args.config}: backbone + FPN, {args.batch}x3x{args.size}x{args.size}, "
        f"median of {args.repeats} (loss off {losses['off']:.6f}, on {losses['on']:.6f})"
    )
    print(f"{'':22s}{'off':>10s}{'on':>10s}{'on/off':>9s}")
    for k in keys:
        off, on = median["off"][k], median["on"][k]
        print(f"{k:22s}{off:10.2f}{on:10.2f}{on / off:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
