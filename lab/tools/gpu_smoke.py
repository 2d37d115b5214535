#!/usr/bin/env python
"""The GPU route end to end, as a pass/fail table: one command, a few minutes on one GPU.

    lab/tools/gpu_smoke.py                      # CUDA, R-50-FPN at 1333x800 (exit 2 without a GPU)
    lab/tools/gpu_smoke.py --device cpu         # the same checks on the CPU at 160x128
    lab/tools/gpu_smoke.py --device cpu --small # ... with the model shrunk to R-18 size (the tests)
    lab/tools/gpu_smoke.py --json smoke.json    # also the table as JSON

Every check runs ``configs/gn_mask_rcnn.yaml``'s model (R-50-FPN Mask R-CNN, BN converted to
GN(32)) or its BN / FrozenBN siblings, with random weights (no download) on random images with
a few random instances each:

- ``train_amp``: a few iterations with the trainer ``gn-det train`` picks for
  ``SOLVER.AMP.ENABLED`` on this device (CUDA: float16 autocast and a gradient scaler), SGD;
- ``train_amp_adamw_clip``: the same with AdamW and gradient clipping: the AdamW must be the
  fused one wherever torch has it (CUDA; CPU from torch 2.4), and the clip must see unscaled
  gradients (their norm is checked against the loss scale);
- ``train_amp_recompute``: ``MODEL.NORM_CONVERSION.RECOMPUTE`` under AMP;
- ``train_amp_weight_standardization``: ``configs/gn_ws_mask_rcnn.yaml`` (GN + WS) under AMP,
  finite losses, and its step time against GN's, interleaved (median of the per-round ratios);
- ``memory_1_image``: peak memory of one training step at 1 image for FrozenBN (4conv1fc head),
  GN and GN + recompute (CUDA: ``max_memory_allocated``; everywhere: the bytes autograd keeps);
- ``ddp_2_processes``: GN and naiveSyncBN over 2 processes (1 image each) when 2 GPUs exist,
  whose backend must be NCCL; gloo on the CPU;
- ``calibrate_distill``: ``gn_det.calibrate`` then ``gn_det.distill`` of a converted BN model
  on this device: calibration must lower the mean relative error of the fitted layers by at
  least ``CALIBRATION_GAIN``, and distillation its loss on a fixed batch by ``DISTILL_GAIN``;
- ``resume``: a checkpoint of an AMP run, and of a float32 run, resumed under the AMP trainer
  (iteration, weights, optimizer state on the device, gradient scaler). Each run trains until
  its optimizer has stepped (AMP's scaler skips the steps whose float16 gradients overflow,
  common in the first steps from random weights), at most ``RESUME_ITERATIONS`` iterations;
- ``export``: TorchScript tracing and ONNX export (checked with ``onnx``, which must be
  installed) of the GN model on this device, the traced module's detections compared with the
  eager model's, their count first;
- ``fold``: ``gn_det.folding.fold_for_inference`` on this device (statistics, 2 distillation
  steps, folding), the folded model's inference time against the GN model's.

On CUDA, a check that allocated nothing on the GPU fails (something fell back to the CPU).
Exit code 0 when nothing failed (skipped checks say why), 1 otherwise; 2 when ``--device cuda``
(the default) is asked for on a host where torch sees no GPU.
"""

from __future__ import annotations

import pathlib, sys  # noqa: E401  (lab/ on the path: gn_det_lab is not installed)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import copy
import inspect
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
    "train_amp_weight_standardization",
    "memory_1_image",
    "ddp_2_processes",
    "calibrate_distill",
    "resume",
    "export",
    "fold",
)


#: Calibration must bring the mean relative error of the fitted layers to at most this share of
#: what it was (a least-squares fit on the images it is measured on: random weights gave
#: 0.255 -> 0.117 on the CPU at R-18 size).
CALIBRATION_GAIN = 0.9
#: Distillation, DISTILL_STEPS steps on one fixed batch (every image), must bring its loss to at
#: most this share of the first step's (R-18 size on the CPU: 0.338 -> 0.246).
DISTILL_STEPS = 4
DISTILL_GAIN = 0.99
#: The most iterations a resume run trains while waiting for its optimizer's first step.
RESUME_ITERATIONS = 6


class Skip(Exception):
    """A check that cannot run here (its reason is the message)."""


def _fused_adamw_expected(device: str) -> bool:
    """Whether torch has a fused AdamW for ``device``, so that gn_det's optimizer must be it:
    on CUDA always (torch >= 2.0), on the CPU from torch 2.4."""
    if device == "cuda":
        return True
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


def _onnx_export_options() -> dict:
    """``dynamo=False`` (the TorchScript-based exporter, the one detectron2's models export with)
    where ``torch.onnx.export`` has that argument (torch >= 2.5; the default from 2.9 is the
    dynamo exporter); torch 2.3-2.4 have only the TorchScript exporter and refuse the argument."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


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
    # What autocast makes of GroupNorm here (CUDA: float16 in, float32 out, group_norm being on
    # its float32 list; CPU bfloat16 autocast leaves it in bfloat16), for the docs' claim.
    norm = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.GroupNorm))
    dtypes = set()
    hook = norm.register_forward_hook(
        lambda module, inputs, output: dtypes.add(f"{inputs[0].dtype} -> {output.dtype}")
    )
    try:
        losses = _losses(trainer, args.iterations)
    finally:
        hook.remove()
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
        + f"; GroupNorm {', '.join(sorted(dtypes)).replace('torch.', '')}"
    )


def check_train_amp_weight_standardization(args) -> str:
    import statistics

    from gn_det import WSConv2d

    batches = [_inputs(args, args.images, seed=i) for i in range(args.iterations)]
    trainers = {}
    for name in ("gn_mask_rcnn.yaml", "gn_ws_mask_rcnn.yaml"):
        cfg = _cfg(name, args)
        trainers[name] = _trainer(cfg, _model(cfg, batches[0]), batches)
    standardized = sum(isinstance(m, WSConv2d) for m in trainers["gn_ws_mask_rcnn.yaml"].model
                       .modules())
    if standardized == 0:
        raise AssertionError("gn_ws_mask_rcnn.yaml built no WSConv2d")
    seconds = {name: [] for name in trainers}
    losses = []
    for round_ in range(args.iterations):
        for name, trainer in list(trainers.items())[:: 1 if round_ % 2 else -1]:
            _sync(args)
            start = time.perf_counter()
            loss = _losses(trainer, 1)
            _sync(args)
            seconds[name].append(time.perf_counter() - start)
            if name == "gn_ws_mask_rcnn.yaml":
                losses += loss
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"non-finite GN + WS loss: {losses}")
    ratios = [a / b for a, b in zip(seconds["gn_ws_mask_rcnn.yaml"][1:],
                                    seconds["gn_mask_rcnn.yaml"][1:])]  # the first: warm-up
    return (f"{standardized} convs standardised; losses " + " ".join(f"{x:.3f}" for x in losses)
            + f"; step GN + WS / GN {statistics.median(ratios or [math.nan]):.3f} (median of "
            f"{len(ratios)} rounds)")


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
    fused = bool(trainer.optimizer.defaults.get("fused"))
    if _fused_adamw_expected(args.device) and not fused:
        raise AssertionError(
            f"the AdamW of gn_det's build_optimizer is not fused on {args.device} "
            f"(torch {torch.__version__} has a fused AdamW there): fused="
            f"{trainer.optimizer.defaults.get('fused')}, "
            f"foreach={trainer.optimizer.defaults.get('foreach')}"
        )
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
    expected = "nccl" if args.device == "cuda" else "gloo"
    backends = sorted({rank["backend"] for rank in ranks})
    if backends != [expected]:
        raise AssertionError(f"process group backend {', '.join(backends)}, expected {expected}")
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
    if not fits:
        raise AssertionError("calibration fitted no layer")
    before = sum(f.error_before for f in fits) / len(fits)
    after = sum(f.error_after for f in fits) / len(fits)
    if not after <= CALIBRATION_GAIN * before:  # also false for NaN
        raise AssertionError(
            f"calibration lowered the mean relative error from {before:.4f} to {after:.4f}, "
            f"not to {CALIBRATION_GAIN:g}x or less"
        )
    # One fixed batch (every image at each step): the losses are comparable step to step. The
    # heads' GN affine only: Adam on every weight of random heads (heads="weights") overshoots.
    result = gn_det.distill(
        student,
        teacher,
        images,
        steps=DISTILL_STEPS,
        batch_size=len(images),
        heads="norms",
        progress=False,
    )
    losses = [float(x) for x in result.losses]
    if len(losses) != DISTILL_STEPS or not losses[-1] <= DISTILL_GAIN * losses[0]:
        raise AssertionError(
            f"distillation did not lower its loss to {DISTILL_GAIN:g}x the first step's or "
            "less: " + " ".join(f"{x:.4g}" for x in losses)
        )
    device = {p.device.type for p in student.parameters()}
    return (
        f"{len(fits)} layers calibrated on {', '.join(sorted(device))}, mean relative error "
        f"{before:.3f} -> {after:.3f}; {len(losses)} distillation steps, loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}"
    )


def _train_until_stepped(trainer, most: int) -> int:
    """Train ``trainer`` one iteration at a time until its optimizer has taken a step (it then
    has state to resume), at most ``most`` iterations; the number run. AMP's gradient scaler
    skips the optimizer on a step whose float16 gradients overflow, and halves its scale: from
    random weights the first steps often are. AssertionError when no step was taken."""
    for done in range(1, most + 1):
        _losses(trainer, 1)
        if trainer.optimizer.state:
            return done
    scaler = getattr(trainer, "grad_scaler", None)
    raise AssertionError(
        f"{type(trainer).__name__}: no optimizer step in {most} iterations"
        + (
            f" (the gradient scaler skipped every one; loss scale now {scaler.get_scale():g})"
            if scaler is not None
            else ""
        )
    )


def _same_optimizer_state(saved, resumed) -> None:
    """AssertionError unless optimizer ``resumed``'s state equals ``saved``'s, each tensor of a
    parameter's state on that parameter's device (the step counter of a non-fused optimizer
    may stay on the CPU)."""
    a, b = saved.state_dict()["state"], resumed.state_dict()["state"]
    if a.keys() != b.keys() or not a:
        raise AssertionError(
            f"optimizer state for {len(b)} parameters after resuming, {len(a)} saved"
        )
    # state_dict numbers the parameters in the order of the param groups
    parameters = [p for group in resumed.param_groups for p in group["params"]]
    for index, state in a.items():
        for key, value in state.items():
            got = b[index].get(key)
            if not isinstance(value, torch.Tensor):
                continue
            if not isinstance(got, torch.Tensor) or not torch.equal(got.cpu(), value.cpu()):
                raise AssertionError(f"optimizer state {key!r} of parameter {index} differs")
            if key != "step" and got.device != parameters[index].device:
                raise AssertionError(
                    f"optimizer state {key!r} on {got.device}, its parameter on "
                    f"{parameters[index].device}"
                )


def check_resume(args) -> str:
    from gn_det.checkpoint import Checkpointer

    cfg = _cfg("gn_mask_rcnn.yaml", args)
    batches = [_inputs(args, args.images, seed=i) for i in range(RESUME_ITERATIONS + 1)]
    notes = []
    with tempfile.TemporaryDirectory() as folder:
        for saved_by in ("amp", "float32"):
            run = os.path.join(folder, saved_by)
            os.makedirs(run)
            model = _model(cfg, batches[0])
            loop = TrainLoop if saved_by == "float32" else training_loop_class(True, args.device)
            first = loop(model, batches, build_optimizer(cfg, model))
            iterations = _train_until_stepped(first, RESUME_ITERATIONS)
            Checkpointer(model, run, trainer=first).save("model_0000001", iteration=first.iter)

            model = _model(cfg, batches[0])
            resumed = _trainer(cfg, model, batches)
            Checkpointer(model, run, trainer=resumed).resume_or_load("", resume=True)
            if resumed.iter != first.iter:
                raise AssertionError(f"resumed at iteration {resumed.iter}, saved at {first.iter}")
            for p, q in zip(model.parameters(), first.model.parameters()):
                if not torch.equal(p, q):
                    raise AssertionError("resumed weights differ from the saved ones")
            _same_optimizer_state(first.optimizer, resumed.optimizer)
            scale = ""
            if hasattr(resumed, "grad_scaler"):
                got = resumed.grad_scaler.get_scale()
                if hasattr(first, "grad_scaler") and got != first.grad_scaler.get_scale():
                    raise AssertionError(
                        f"resumed loss scale {got:g}, saved {first.grad_scaler.get_scale():g}"
                    )
                scale = f" (loss scale {got:g})"
            at = resumed.iter
            losses = _losses(resumed, 1)
            if resumed.iter <= at or not all(math.isfinite(x) for x in losses):
                raise AssertionError(f"the resumed run did not train on: losses {losses}")
            notes.append(
                f"{saved_by} run (first step at iteration {iterations}) resumed under "
                f"{type(resumed).__name__}{scale}"
            )
    return "; ".join(notes)


def _compare_detections(exported, eager) -> float:
    """The largest box coordinate difference between the traced module's and the eager model's
    detections; AssertionError (counts first) when they differ in number or by more than 1e-2."""
    if len(exported) != len(eager):
        raise AssertionError(
            f"{len(exported)} traced vs {len(eager)} eager detections on the same image"
        )
    if len(eager) == 0:
        raise AssertionError("no detections, traced or eager, at score threshold 0")
    difference = (exported.pred_boxes.tensor - eager.pred_boxes.tensor).abs().max().item()
    if not difference <= 1e-2:
        raise AssertionError(f"traced boxes up to {difference:g} from the eager model's")
    return difference


def check_export(args) -> str:
    try:
        import onnx
    except ImportError:
        raise AssertionError(
            "onnx is not installed: pip install onnx==1.23.2 (requirements/base.txt's pin), "
            "or run only the other checks (--checks ...)"
        ) from None
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
    difference = _compare_detections(exported, eager)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    onnx_file = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(adapter, (image,), onnx_file, opset_version=16, **_onnx_export_options())
    graph = onnx.load_from_string(onnx_file.getvalue())
    onnx.checker.check_model(graph)
    ops = [node.op_type for node in graph.graph.node]
    if "BatchNormalization" in ops or "InstanceNormalization" not in ops:
        raise AssertionError(
            f"ONNX graph of the GN model: {ops.count('InstanceNormalization')} "
            f"InstanceNormalization (GroupNorm's lowering), {ops.count('BatchNormalization')} "
            "BatchNormalization"
        )
    return (
        f"TorchScript {buffer.getbuffer().nbytes / 2**20:.0f} MiB, {len(eager)} detections, "
        f"boxes within {difference:.2g} of eager; ONNX {onnx_file.getbuffer().nbytes / 2**20:.0f} "
        f"MiB, {ops.count('InstanceNormalization')} InstanceNormalization, checked by onnx "
        f"{onnx.__version__}"
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
        "train_amp_weight_standardization": check_train_amp_weight_standardization,
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
        allocations = _cuda_allocations(args)
        try:
            status, detail = "PASS", functions[name](args)
            # The 2-process check's GPU work is in its processes (it asserts NCCL instead).
            if (
                args.device == "cuda"
                and name != "ddp_2_processes"
                and _cuda_allocations(args) == allocations
            ):
                raise AssertionError("nothing was allocated on the GPU: the check ran elsewhere")
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


def _cuda_allocations(args) -> int:
    """How many allocations the CUDA caching allocator has made so far (0 off CUDA)."""
    if args.device != "cuda":
        return 0
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0)


def table(rows: list, args) -> str:
    device = "CPU"
    if args.device == "cuda":
        device = (
            f"{torch.cuda.get_device_name()} (TF32: convolutions "
            f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, matmuls "
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
        )
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
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default; exit 2 where torch sees no GPU, never a silent CPU run) or cpu",
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
        build = (
            f"this torch is built for CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "this torch is a CPU-only build"
        )
        parser.error(
            f"--device cuda, but torch sees no usable GPU here ({build}): check the GPUs are "
            "visible (docker run --gpus all, nvidia-smi) and the driver supports that CUDA; "
            "--device cpu runs the CPU version on purpose"
        )
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
