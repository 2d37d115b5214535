#!/usr/bin/env python
"""What Weight Standardization costs: the training step, inference and memory of GN + WS
against GN, on the demo's model.

    lab/tools/benchmark_ws.py --output lab/results/ws_cost.json        # ~4 min on 2 cores
    lab/tools/benchmark_ws.py --smoke                                  # seconds (tests)

Three variants of the demo recipe's Mask R-CNN (``shapes/gn.yaml``, R-18-FPN), each built from
the same seed in this process: ``gn``; ``gn_ws``, ``shapes/gn_ws.yaml`` (gn_det's
:class:`gn_det.WSConv2d`: a hand-written backward, the standardised weight cached where it
cannot change); ``gn_ws_parametrize``, the same convolutions standardised with
``torch.nn.utils.parametrize`` and autograd (the plain-PyTorch way). Each trains on the same
batch as the recipe trains (its optimizer, bfloat16 autocast where the config enables it and
the CPU has it), and runs inference on one image; variants interleaved, the order rotating each
round. Ratios to ``gn`` are taken round by round (the two steps ran seconds apart) and their
median and quartiles reported; inference is timed on the second of two calls in eval mode (the
standardised weights cached by the first, as in deployment). Memory: the bytes autograd keeps
for backward at the end of a training forward (``gn_det_lab.memory.SavedForBackward``,
parameters left out).
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import platform
import statistics
import time

VARIANTS = {"gn": "shapes/gn.yaml", "gn_ws": "shapes/gn_ws.yaml",
            "gn_ws_parametrize": "shapes/gn.yaml"}
REFERENCE = "gn"


class _Standardized:
    """A ``parametrize`` parametrisation: WS with autograd's backward."""

    def __new__(cls):
        import torch

        class Standardized(torch.nn.Module):
            def forward(self, weight):
                flat = weight.reshape(weight.shape[0], -1)
                var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
                return ((flat - mean) / (var + 1e-5).sqrt()).view_as(weight)

        return Standardized()


def build(variant: str, smoke: bool):
    """(model, optimizer, autocast context factory, cfg) of a variant."""
    import torch
    from detectron2.layers import Conv2d
    from detectron2.modeling import build_model
    from torch.nn.utils import parametrize

    from gn_det.cli.config_files import load_config, resolve_config_name
    from gn_det.engine import Trainer, cpu_bfloat16_supported
    from gn_det_lab.runs import SMOKE_OPTS

    cfg = load_config(resolve_config_name(VARIANTS[variant]))
    # Every variant's heads do the same work at inference: no score threshold, a fixed number
    # of detections (random weights differ in what they would detect).
    cfg.merge_from_list((SMOKE_OPTS if smoke else []) + [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "50"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if variant == "gn_ws_parametrize":
        for module in model.modules():
            if isinstance(module, Conv2d) and isinstance(module.norm, torch.nn.GroupNorm):
                parametrize.register_parametrization(module, "weight", _Standardized())
    amp = cfg.SOLVER.AMP.ENABLED and cpu_bfloat16_supported()

    def autocast():
        return (torch.autocast("cpu", dtype=torch.bfloat16) if amp
                else contextlib.nullcontext())

    return model, Trainer.build_optimizer(cfg, model), autocast, cfg


def load_batch(cfg, count: int):
    from detectron2.data import DatasetCatalog, DatasetMapper

    mapper = DatasetMapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:count]]


def train_step(model, optimizer, autocast, batch) -> None:
    from detectron2.utils.events import EventStorage

    with EventStorage(), autocast():
        losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


def saved_mib(model, autocast, batch) -> float:
    from detectron2.utils.events import EventStorage

    from gn_det_lab.memory import SavedForBackward

    with SavedForBackward(model.parameters()) as saved, EventStorage(), autocast():
        losses = model(batch)
        nbytes = saved.nbytes
    del losses
    return nbytes / 2**20


def measure(args) -> dict:
    import torch

    torch.set_flush_denormal(True)
    built = {v: build(v, args.smoke) for v in VARIANTS}
    batch = load_batch(built[REFERENCE][3], built[REFERENCE][3].SOLVER.IMS_PER_BATCH)
    samples = {v: {"step": [], "inference": []} for v in VARIANTS}

    def run(v, record):
        model, optimizer, autocast, _ = built[v]
        model.train()
        start = time.perf_counter()
        train_step(model, optimizer, autocast, batch)
        step = time.perf_counter() - start
        model.eval()
        with torch.no_grad(), autocast():
            model([{"image": batch[0]["image"]}])  # steady state: WS's weights cached after it
            start = time.perf_counter()
            model([{"image": batch[0]["image"]}])
            inference = time.perf_counter() - start
        if record:
            samples[v]["step"].append(step)
            samples[v]["inference"].append(inference)

    names = list(VARIANTS)
    for v in names:
        run(v, record=False)
    for r in range(args.repeats):
        for v in names[r % len(names):] + names[: r % len(names)]:
            run(v, record=True)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{v} {samples[v]['step'][-1]:.3f} s" for v in names), file=sys.stderr, flush=True)
    memory = {v: saved_mib(built[v][0].train(), built[v][2], batch) for v in names}
    results = {}
    for v in names:
        row = {"memory_saved_mib": memory[v], "samples": samples[v]}
        for kind in ("step", "inference"):
            row[kind] = statistics.median(samples[v][kind])
            ratios = [a / b for a, b in zip(samples[v][kind], samples[REFERENCE][kind])]
            q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            row[f"{kind}_ratio"] = {"median": statistics.median(ratios), "q1": q1, "q3": q3}
        results[v] = row
    return results


def table(results: dict):
    columns = ["variant", "train step (s)", "step / GN (median [IQR] of rounds)",
               "inference (s)", "inference / GN", "saved for backward (MiB)"]
    rows = []
    for v, r in results.items():
        s, i = r["step_ratio"], r["inference_ratio"]
        rows.append([v, f"{r['step']:.3f}", f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]",
                     f"{r['inference']:.3f}", f"{i['median']:.3f}", f"{r['memory_saved_mib']:.0f}"])
    return columns, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--output", default=None, help="results JSON to write")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 rounds (tests)")
    args = parser.parse_args(argv)
    import torch

    import gn_det  # noqa: F401  (registers the configs' parts and datasets)
    from gn_det_lab.results import markdown_table, write_results

    torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeats = min(args.repeats, 3)
    results = measure(args)
    columns, rows = table(results)
    print(markdown_table(columns, rows))
    if args.output:
        write_results(
            args.output,
            title="Weight Standardization's cost on the demo model (CPU)",
            command="lab/tools/benchmark_ws.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:]),
            machine=f"{platform.processor() or platform.machine()}, {args.threads} threads, "
                    f"torch {torch.__version__}",
            columns=columns, rows=rows, data=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
