#!/usr/bin/env python
"""The GPU route end to end, as a pass/fail table: one command, a few minutes on one GPU.

    lab/tools/gpu_smoke.py                      # CUDA if this host has it: R-50-FPN at 1333x800
    lab/tools/gpu_smoke.py --device cpu         # the same checks on the CPU at 160x128
    lab/tools/gpu_smoke.py --device cpu --small # ... with the model shrunk to R-18 size (the tests)
    lab/tools/gpu_smoke.py --json smoke.json    # also the table as JSON

Every check runs ``configs/gn_mask_rcnn.yaml``'s model (R-50-FPN Mask R-CNN, BN converted to
GN(32)) or its BN / FrozenBN siblings, with random weights (no download) on random images with
a few random instances each:

- ``train_amp``: a few iterations with the trainer ``gn-det train`` picks for
  ``SOLVER.AMP.ENABLED`` on this device (CUDA: float16 autocast and a gradient scaler), SGD;
- ``train_amp_adamw_clip``: the same with fused AdamW and gradient clipping (the clip must see
  unscaled gradients: their norm is checked against the loss scale);
- ``train_amp_recompute``: ``MODEL.NORM_CONVERSION.RECOMPUTE`` under AMP;
- ``memory_1_image``: peak memory of one training step at 1 image for FrozenBN (4conv1fc head),
  GN and GN + recompute (CUDA: ``max_memory_allocated``; everywhere: the bytes autograd keeps);
- ``ddp_2_processes``: GN and naiveSyncBN over 2 processes (NCCL, 1 image each) when 2 GPUs
  exist; gloo on the CPU;
- ``calibrate_distill``: ``gn_det.calibrate`` then ``gn_det.distill`` of a converted BN model
  on this device;
- ``resume``: a checkpoint of an AMP run, and of a float32 run, resumed under the AMP trainer
  (iteration, optimizer state on the device, gradient scaler);
- ``export``: TorchScript tracing and ONNX export of the GN model on this device, the traced
  module's output compared with the eager model's;
- ``fold``: ``gn_det.folding.fold_for_inference`` on this device (statistics, 2 distillation
  steps, folding), the folded model's inference time against the GN model's.

Exit code 0 when nothing failed (skipped checks say why), 1 otherwise.
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import copy
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings

import torch

from gn_det.cli.train import launch
from gn_det.engine import TrainLoop, build_optimizer, training_loop_class
from gn_det_lab.random_weights import SMALL_MODEL_OPTS

CHECKS = (
    "train_amp",
    "train_amp_adamw_clip",
    "train_amp_recompute",
    "memory_1_image",
    "ddp_2_processes",
    "calibrate_distill",
    "resume",
    "export",
    "fold",
)


class Skip(Exception):
    """A check that cannot run here (its reason is the message)."""


def _cfg(name: str, args, *overrides: str):
    from gn_det.cli.config_files import load_config, resolve_config_name

    cfg = load_config(resolve_config_name(name))
    cfg.merge_from_list(
        [
            *(SMALL_MODEL_OPTS if args.small else []),
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            args.device,
            "SOLVER.BASE_LR",
            "1e-3",
            "SOLVER.AMP.ENABLED",
            "True",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "0.0",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "100",
            "TEST.DETECTIONS_PER_IMAGE",
            "20",
            *overrides,
        ]
    )
    return cfg


def _inputs(args, count: int, seed: int = 0) -> list:
    """``count`` training inputs at ``args.height`` x ``args.width``: a smooth random image and
    3 boxes with their masks."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = args.height, args.width
    out = []
    for _ in range(count):
        coarse = torch.rand(3, 1, h // 16 + 1, w // 16 + 1, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")[:, 0] * 255
        x0 = torch.rand(3, generator=g) * w * 0.6
        y0 = torch.rand(3, generator=g) * h * 0.6
        boxes = torch.stack([x0, y0, x0 + w * 0.3, y0 + h * 0.3], dim=1)
        masks = torch.zeros(3, h, w, dtype=torch.bool)
        for m, (a, b, c, d) in zip(masks, boxes.round().long().tolist()):
            m[b:d, a:c] = True
        instances = Instances(
            (h, w),
            gt_boxes=Boxes(boxes),
            gt_classes=torch.tensor([1, 2, 3]),
            gt_masks=BitMasks(masks),
        )
        out.append({"image": image, "instances": instances, "height": h, "width": w})
    return out


def _model(cfg, batch):
    from detectron2.modeling import build_model

    from detectron2.layers import FrozenBatchNorm2d

    from gn_det_lab.random_weights import normalize_norm_statistics

    torch.manual_seed(0)
    model = build_model(cfg).train()
    # Random BN / FrozenBN statistics would overflow float16 in R-50's last stages.
    normalize_norm_statistics(model, batch, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))
    return model


def _trainer(cfg, model, batches):
    loop = training_loop_class(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE)
    return loop(model, batches, build_optimizer(cfg, model))


def _losses(trainer, iterations: int) -> list:
    """Train ``iterations`` steps; the total loss of each (from detectron2's event storage, which
    only the main process of a multi-process run fills)."""
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    seen = []

    class Record(HookBase):
        def after_step(self):
            if comm.is_main_process():
                seen.append(self.trainer.storage.history("total_loss").latest())

    trainer.register_hooks([Record()])
    start = trainer.iter + 1 if trainer.iter else 0
    trainer.train(start, start + iterations)
    return seen


def _sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def check_train_amp(args, *overrides: str) -> str:
    cfg = _cfg("gn_mask_rcnn.yaml", args, *overrides)
    batches = [_inputs(args, args.images, seed=i) for i in range(args.iterations)]
    trainer = _trainer(cfg, _model(cfg, batches[0]), batches)
    losses = _losses(trainer, args.iterations)
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    scale = (
        f", loss scale {trainer.grad_scaler.get_scale():g}"
        if hasattr(trainer, "grad_scaler")
        else ""
    )
    return (
        f"{type(trainer).__name__}, {type(trainer.optimizer).__name__}, losses "
        + " ".join(f"{x:.3f}" for x in losses)
        + scale
    )


def check_train_amp_adamw_clip(args) -> str:
    """AdamW (fused where available) + norm clipping at 1.0: the clip must see unscaled
    gradients. A hook before the clip records the largest gradient norm it saw."""
    cfg = _cfg(
        "gn_mask_rcnn.yaml",
        args,
        "SOLVER.OPTIMIZER",
        "AdamW",
        "SOLVER.BASE_LR",
        "1e-4",
        "SOLVER.CLIP_GRADIENTS.ENABLED",
        "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
        "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
        "1.0",
    )
    batches = [_inputs(args, args.images, seed=i) for i in range(args.iterations)]
    trainer = _trainer(cfg, _model(cfg, batches[0]), batches)
    norms = []
    step = type(trainer.optimizer).step

    def recording_step(optimizer, *a, **k):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(max(float(g.float().norm()) for g in grads))
        return step(optimizer, *a, **k)

    trainer.optimizer.step = recording_step.__get__(trainer.optimizer)
    losses = _losses(trainer, args.iterations)
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    scale = trainer.grad_scaler.get_scale() if hasattr(trainer, "grad_scaler") else 1.0
    finite = [n for n in norms if math.isfinite(n)]
    if scale > 1 and finite and max(finite) > scale / 16:
        raise AssertionError(
            f"the clip saw gradient norms up to {max(finite):g}, of the order of "
            f"the loss scale {scale:g}: scaled gradients"
        )
    fused = trainer.optimizer.defaults.get("fused")
    return (
        f"{type(trainer).__name__}, AdamW fused={fused}, largest per-parameter gradient norm "
        f"before the clip {max(finite) if finite else float('nan'):.3g} (loss scale {scale:g})"
    )


def _step_memory(cfg, args) -> dict:
    from detectron2.utils.events import EventStorage

    from gn_det_lab.memory import SavedForBackward

    batch = _inputs(args, 1)
    model = _model(cfg, batch)
    optimizer = build_optimizer(cfg, model)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with SavedForBackward(model.parameters()) as saved, EventStorage():
        losses = model(batch)
    saved_bytes = saved.nbytes
    sum(losses.values()).backward()
    optimizer.step()
    _sync(args)
    result = {"saved_mib": saved_bytes / 2**20}
    if args.device == "cuda":
        result["peak_growth_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def check_memory_1_image(args) -> str:
    fp32 = ["SOLVER.AMP.ENABLED", "False"]
    variants = {
        "frozenbn_4conv1fc": (
            "mask_rcnn_R_50_FPN_frozenbn.yaml",
            ["MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.NUM_FC", "1"],
        ),
        "gn": ("gn_mask_rcnn.yaml", []),
        "gn_recompute": ("gn_mask_rcnn.yaml", ["MODEL.NORM_CONVERSION.RECOMPUTE", "True"]),
    }
    measured = {
        name: _step_memory(_cfg(config, args, *fp32, *extra), args)
        for name, (config, extra) in variants.items()
    }
    key = "peak_growth_mib" if args.device == "cuda" else "saved_mib"
    if not measured["gn_recompute"][key] < measured["gn"][key]:
        raise AssertionError(f"recompute did not lower {key}: {measured}")
    return "; ".join(
        f"{name} " + ", ".join(f"{k} {v:.0f}" for k, v in m.items()) for name, m in measured.items()
    )


def _ddp_worker(args, out_path: str) -> None:
    import torch.distributed as dist
    from detectron2.utils import comm

    from gn_det.engine import create_ddp_model

    warnings.filterwarnings("ignore")
    if args.device == "cpu":  # the 2 processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    rank = comm.get_rank()
    batch = _inputs(args, 2)[rank : rank + 1]
    result = {"backend": dist.get_backend()}
    for name, config, extra in [
        ("gn", "gn_mask_rcnn.yaml", []),
        (
            "naive_syncbn",
            "mask_rcnn_R_50_FPN_bn.yaml",
            [
                x
                for k in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
                for x in (f"MODEL.{k}.NORM", "naiveSyncBN")
            ],
        ),
    ]:
        cfg = _cfg(config, args, "SOLVER.AMP.ENABLED", "False", *extra)
        model = create_ddp_model(_model(cfg, batch), broadcast_buffers=False)
        trainer = _trainer(cfg, model, [batch] * 2)
        losses = _losses(trainer, 2)
        result[name] = losses
    gathered = comm.gather(result, dst=0)
    if rank == 0:  # the losses are rank 0's (detectron2 averages them over the processes)
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def check_ddp_2_processes(args) -> str:
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 GPUs, this machine shows {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "ddp.json")
        launch(_ddp_worker, 2, device=args.device, dist_url="auto", args=(args, out_path))
        with open(out_path) as f:
            ranks = json.load(f)
    for name in ("gn", "naive_syncbn"):
        if len(ranks[0][name]) != 2 or not all(math.isfinite(x) for x in ranks[0][name]):
            raise AssertionError(f"{name}: losses {ranks[0][name]}")
    return f"{len(ranks)} processes, {ranks[0]['backend']}; " + "; ".join(
        f"{name} losses " + " ".join(f"{x:.3f}" for x in ranks[0][name])
        for name in ("gn", "naive_syncbn")
    )


def check_calibrate_distill(args) -> str:
    import gn_det

    cfg = _cfg("mask_rcnn_R_50_FPN_bn.yaml", args)
    images = _inputs(args, 2)
    teacher = _model(cfg, images).eval()
    student = gn_det.convert_norm(copy.deepcopy(teacher))
    images = [{"image": d["image"]} for d in images]
    fits = gn_det.calibrate(student, teacher, images, batch_size=1, progress=False)
    before = sum(f.error_before for f in fits) / len(fits)
    after = sum(f.error_after for f in fits) / len(fits)
    if not after <= before:
        raise AssertionError(f"calibration made the fit worse: {before:.4f} -> {after:.4f}")
    result = gn_det.distill(student, teacher, images, steps=2, batch_size=1, progress=False)
    if not all(math.isfinite(float(x)) for x in result.losses):
        raise AssertionError(f"distillation loss not finite: {result.losses}")
    device = {p.device.type for p in student.parameters()}
    return (
        f"{len(fits)} layers calibrated on {', '.join(sorted(device))}, mean relative error "
        f"{before:.3f} -> {after:.3f}; {len(result.losses)} distillation steps, finite losses"
    )


def check_resume(args) -> str:
    from gn_det.checkpoint import Checkpointer

    cfg = _cfg("gn_mask_rcnn.yaml", args)
    batches = [_inputs(args, args.images, seed=i) for i in range(2)]
    notes = []
    with tempfile.TemporaryDirectory() as folder:
        for saved_by in ("amp", "float32"):
            run = os.path.join(folder, saved_by)
            os.makedirs(run)
            model = _model(cfg, batches[0])
            loop = TrainLoop if saved_by == "float32" else training_loop_class(True, args.device)
            first = loop(model, batches, build_optimizer(cfg, model))
            _losses(first, 2)
            Checkpointer(model, run, trainer=first).save("model_0000001", iteration=first.iter)

            model = _model(cfg, batches[0])
            resumed = _trainer(cfg, model, batches)
            Checkpointer(model, run, trainer=resumed).resume_or_load("", resume=True)
            if resumed.iter != first.iter:
                raise AssertionError(f"resumed at iteration {resumed.iter}, saved at {first.iter}")
            for p, q in zip(model.parameters(), first.model.parameters()):
                if not torch.equal(p, q):
                    raise AssertionError("resumed weights differ from the saved ones")
            states = [s for s in resumed.optimizer.state.values() if "momentum_buffer" in s]
            if not states or any(
                s["momentum_buffer"].device != p.device for s, p in zip(states, model.parameters())
            ):
                raise AssertionError("optimizer state missing or not on the model's device")
            _losses(resumed, 1)
            scale = (
                f" (loss scale {resumed.grad_scaler.get_scale():g})"
                if hasattr(resumed, "grad_scaler")
                else ""
            )
            notes.append(f"{saved_by} run resumed under {type(resumed).__name__}{scale}")
    return "; ".join(notes)


def check_export(args) -> str:
    from detectron2.export import TracingAdapter

    cfg = _cfg("gn_mask_rcnn.yaml", args, "SOLVER.AMP.ENABLED", "False")
    model = _model(cfg, _inputs(args, 1)).eval()
    image = _inputs(args, 1, seed=3)[0]["image"].to(args.device)

    def inference(m, x):
        return m.inference([{"image": x}], do_postprocess=False)[0]

    adapter = TracingAdapter(model, (image,), inference).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
        eager = inference(model, image)
        exported = adapter.outputs_schema(traced(image))
    difference = (exported.pred_boxes.tensor - eager.pred_boxes.tensor).abs().max().item()
    if len(exported) != len(eager) or difference > 1e-2:
        raise AssertionError(
            f"traced output differs from eager: {len(exported)} vs {len(eager)} "
            f"detections, boxes up to {difference:g} apart"
        )
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    try:
        import onnx  # noqa: F401
    except ImportError:
        return (
            f"TorchScript ok (boxes within {difference:.2g}); ONNX skipped: onnx is not installed"
        )
    onnx_file = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(adapter, (image,), onnx_file, opset_version=16, dynamo=False)
    return (
        f"TorchScript {buffer.getbuffer().nbytes / 2**20:.0f} MiB, boxes within {difference:.2g} "
        f"of eager; ONNX {onnx_file.getbuffer().nbytes / 2**20:.0f} MiB"
    )


def check_fold(args) -> str:
    from gn_det.folding import fold_for_inference

    cfg = _cfg("gn_mask_rcnn.yaml", args, "SOLVER.AMP.ENABLED", "False")
    images = [{"image": d["image"].to(args.device)} for d in _inputs(args, 2)]
    model = _model(cfg, _inputs(args, 1)).eval()
    folded, report = fold_for_inference(
        model, images, distill_steps=2, batch_size=1, progress=False
    )
    counts = report.counts()
    if counts.get("folded into the conv", 0) == 0 or any(
        isinstance(m, torch.nn.GroupNorm) for m in folded.modules()
    ):
        raise AssertionError(f"nothing folded, or GroupNorm left: {counts}")

    def seconds(m):
        with torch.no_grad():
            m(images[:1])
            _sync(args)
            start = time.perf_counter()
            for _ in range(3):
                m(images[:1])
            _sync(args)
        return (time.perf_counter() - start) / 3

    gn_time, folded_time = seconds(model), seconds(folded)
    return (
        f"{counts['folded into the conv']} layers folded on {args.device}; "
        f"inference {folded_time:.3f} s "
        f"against GN's {gn_time:.3f} s ({folded_time / gn_time:.2f}x)"
    )


def run(args) -> list:
    functions = {
        "train_amp": check_train_amp,
        "train_amp_adamw_clip": check_train_amp_adamw_clip,
        "train_amp_recompute": lambda a: check_train_amp(
            a, "MODEL.NORM_CONVERSION.RECOMPUTE", "True"
        ),
        "memory_1_image": check_memory_1_image,
        "ddp_2_processes": check_ddp_2_processes,
        "calibrate_distill": check_calibrate_distill,
        "resume": check_resume,
        "export": check_export,
        "fold": check_fold,
    }
    rows = []
    for name in args.checks:
        start = time.perf_counter()
        try:
            status, detail = "PASS", functions[name](args)
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:  # a failed check is a row of the table, not the end of the run
            lines = [line for line in str(e).splitlines() if line.strip()]
            status, detail = "FAIL", f"{type(e).__name__}: {lines[-1] if lines else ''}"
            if args.debug:
                traceback.print_exc()
        rows.append(
            {
                "check": name,
                "status": status,
                "seconds": round(time.perf_counter() - start, 1),
                "detail": detail,
            }
        )
        print(f"{status} {name} ({rows[-1]['seconds']} s): {detail}", file=sys.stderr, flush=True)
    return rows


def table(rows: list, args) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"gn_det GPU smoke: {device}, torch {torch.__version__}, {args.width}x{args.height}, "
        + ("R-18-sized models, " if args.small else "")
        + f"{args.images} image(s) per step",
        "",
        "| check | result | seconds | detail |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['check']} | {r['status']} | {r['seconds']} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--width", type=int, help="image width (default 1333 on CUDA, 160 on CPU)")
    parser.add_argument("--height", type=int, help="image height (default 800 on CUDA, 128 on CPU)")
    parser.add_argument("--images", type=int, default=1, help="images per training step")
    parser.add_argument(
        "--iterations", type=int, default=3, help="training steps per training check"
    )
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument(
        "--small",
        action="store_true",
        help="every model shrunk to R-18 with 64-wide FPN and heads (the CPU tests)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of a failed check"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False here")
    large = args.device == "cuda"
    args.width = args.width or (1333 if large else 160)
    args.height = args.height or (800 if large else 128)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    for name in ("detectron2", "fvcore", "gn_det"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = run(args)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=1
            )
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
