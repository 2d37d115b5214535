#!/usr/bin/env python
"""Where a training step's time goes: data, forward per part, backward, optimizer step.

    lab/tools/profile_train_step.py --config shapes/gn.yaml [--iters 8] [--autocast] [KEY VALUE ...]

Builds the config's model and training loader in this process (no data-loader workers), runs
``--iters`` steps after 2 warm-up steps, and prints the mean milliseconds per step of each part
(forward times nest: the backbone includes its bottom-up, the ROI heads their box and mask
heads). ``--autocast`` runs the forward in bfloat16 as ``SOLVER.AMP.ENABLED`` does on a CPU.
``--ops N`` also runs the measured steps under ``torch.profiler`` and prints its N ops of most
self time (the profiler's overhead is in those steps' times).
Numbers from lab/benchmarks.md ("The demo recipe") came from this script.
"""

import argparse
import collections
import contextlib
import sys
import time

import torch
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from gn_det.cli.config_files import load_config, merge_overrides, resolve_config_name
from gn_det.engine import build_optimizer

PARTS = {
    "backbone.bottom_up": "forward: backbone bottom-up",
    "backbone": "forward: backbone + FPN",
    "proposal_generator": "forward: RPN",
    "roi_heads.box_head": "forward: box head",
    "roi_heads.mask_head": "forward: mask head",
    "roi_heads": "forward: ROI heads",
}


def _timed(module, label, times):
    forward = module.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            times[label] += time.perf_counter() - start

    module.forward = timed_forward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config name or path (shapes/gn.yaml)")
    parser.add_argument("--iters", type=int, default=8, help="measured steps (after 2 warm-up)")
    parser.add_argument("--autocast", action="store_true", help="bfloat16 autocast forward (CPU)")
    parser.add_argument("--ops", type=int, default=0, help="print the N ops of most self time")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)

    cfg = merge_overrides(load_config(resolve_config_name(args.config)), args.opts)
    cfg.MODEL.DEVICE, cfg.DATALOADER.NUM_WORKERS = "cpu", 0
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)  # the training's own: SGD or AdamW as configured
    loader = iter(build_detection_train_loader(cfg))
    times = collections.defaultdict(float)
    for name, label in PARTS.items():
        _timed(model.get_submodule(name), label, times)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()
    )
    profiler = contextlib.ExitStack()
    with EventStorage(), profiler:
        for step in range(args.iters + 2):
            if step == 2:
                if args.ops:
                    ops = profiler.enter_context(
                        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    )
                times.clear()
                start = time.perf_counter()
            tick = time.perf_counter()
            data = next(loader)
            times["data"] += time.perf_counter() - tick
            tick = time.perf_counter()
            with autocast:
                loss = sum(model(data).values())
            times["forward (all)"] += time.perf_counter() - tick
            tick = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            times["backward"] += time.perf_counter() - tick
            tick = time.perf_counter()
            optimizer.step()
            times["optimizer step"] += time.perf_counter() - tick
        total = time.perf_counter() - start  # before the profiler's teardown
    print(
        f"{args.config} {' '.join(args.opts)}{' (bf16 autocast)' if args.autocast else ''}: "
        f"{total / args.iters:.3f} s per step ({torch.get_num_threads()} threads)"
    )
    for label, seconds in sorted(times.items(), key=lambda item: -item[1]):
        print(f"  {label:28s} {seconds / args.iters * 1000:8.1f} ms")
    if args.ops:
        print(f"torch.profiler, {args.iters} steps:")
        print(ops.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
