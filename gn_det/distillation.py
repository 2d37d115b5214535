"""Feature distillation of converted GroupNorm layers' affine parameters (and R-CNN head weights).

:func:`distill` trains the converted GN layers together for what the heads see, where
:func:`gn_det.calibrate` fits each on its own; in an R-CNN's box and mask heads, whose GN removes
each region's overall level that no affine brings back, it trains the heads' weights too. The
method and what it keeps: docs/transfer.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Iterable, List

import torch
from torch import nn
from tqdm import tqdm

from .inputs import (eval_mode, heads_run_on_features, input_items, is_detectron2_model,
                     sampled_regions, teacher_regions)
from .layers import ChannelAffine, ConvertedGroupNorm

__all__ = ["DistillationResult", "HEADS", "distill"]

HEADS = ("weights", "norms", "none")  # what of an R-CNN's ROI heads distill trains (distill's doc)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistillationResult:
    losses: List[float]  # relative squared error of the outputs, per step (before the update)
    parameters: int  # number of scalars trained (the converted GN layers' affine, head weights)
    heads: str  # what was trained in ROI heads, as ``distill``'s argument: "none" if it had none


def _module_outputs(model: nn.Module, batch) -> List[torch.Tensor]:
    """A plain module's output as a list of tensors (dict values in key order)."""
    out = model(batch)
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _has_roi_heads(model: nn.Module) -> bool:
    from detectron2.modeling import StandardROIHeads

    return heads_run_on_features(model) and isinstance(model.roi_heads, StandardROIHeads)


def _detector_outputs(model: nn.Module, features: dict, regions) -> List[torch.Tensor]:
    """FPN outputs, then (given regions) the box head's output on the proposals and the mask
    head's logits on the detections."""
    outputs = [features[k] for k in sorted(features)]
    if regions is None:
        return outputs
    heads, (proposal_boxes, detection_boxes) = model.roi_heads, regions
    if heads.box_pooler is not None:
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], proposal_boxes)
        outputs.append(heads.box_head(pooled))
    if heads.mask_on and heads.mask_pooler is not None and sum(len(b) for b in detection_boxes):
        pooled = heads.mask_pooler([features[f] for f in heads.mask_in_features], detection_boxes)
        outputs.append(heads.mask_head.layers(pooled))
    return outputs


def _relative_error(student: List[torch.Tensor], teacher: List[torch.Tensor]) -> torch.Tensor:
    """Mean over outputs of ‖s − t‖² / ‖t − per-channel mean of t‖²."""
    terms = []
    for s, t in zip(student, teacher):
        centred = t - t.mean(dim=[d for d in range(t.dim()) if d != 1], keepdim=True)
        terms.append((s - t).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distill(student: nn.Module, teacher: nn.Module, inputs: Iterable, *, steps: int = 100,
            lr: float = 0.01, batch_size: int = 4, seed: int = 0, progress: bool = True,
            head_proposals: int = 100, head_detections: int = 16, heads: str = "weights",
            head_lr: float = 1e-3) -> DistillationResult:
    """
    Train the affine of ``student``'s converted GN layers (and an R-CNN's ROI-head weights) with
    Adam at cosine-decayed learning rates so that its outputs match ``teacher``'s, by relative
    squared error ‖s − t‖² / ‖t − per-channel mean of t‖²: a plain module's outputs, or a
    detectron2 model's FPN levels and, for an R-CNN with ``StandardROIHeads``, its box head's
    output and mask logits on the teacher's regions. The fixed affines of
    ``gn_det.fold_for_inference`` (:class:`gn_det.folding.ChannelAffine`) train the same way,
    against the GN model they came from.

    Args:
        student: a model converted by ``gn_det.convert_norm`` from ``teacher`` (typically after
            ``stats`` transfer and :func:`gn_det.calibrate`, whose fit it starts from).
        teacher: the BN model, run in eval mode; never modified (modes restored).
        inputs: as for :func:`gn_det.calibrate` (:mod:`gn_det.inputs`).
        steps: optimisation steps, each on ``batch_size`` images drawn without replacement
            (reshuffled every pass over the inputs) from a generator seeded by ``seed``.
        lr: Adam's initial learning rate of the GN affine.
        head_proposals, head_detections: the teacher's top RPN proposals and detections per
            image on which an R-CNN's box and mask heads are distilled (as in ``calibrate``).
        heads: for such an R-CNN: ``"weights"`` (default) trains the heads' GN affine and
            every weight (at ``head_lr``); ``"norms"`` their GN affine only; ``"none"`` the
            backbone alone, on its outputs (for untrained heads). No effect on other models.

    Returns:
        The loss before each step. Frozen parameters (``requires_grad`` False) are not trained,
        and nothing else in the student is (flags restored after). Deterministic for a seed on
        a deterministic device.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {', '.join(HEADS)}, got {heads!r}")
    items = input_items(student, inputs)
    if len(items) == 0:
        raise ValueError("distill needs at least one input image")
    roi, trained, head_parameters = _parameters_to_train(student, teacher, heads)
    groups = [{"params": trained, "lr": lr, "initial_lr": lr}]
    if head_parameters:
        groups.append({"params": head_parameters, "lr": head_lr, "initial_lr": head_lr})
    optimizer = torch.optim.Adam(groups)
    batches = _batches(items, batch_size, torch.Generator().manual_seed(seed))
    losses = []
    with contextlib.ExitStack() as stack:
        selected = set(map(id, trained + head_parameters))
        for p in student.parameters():
            stack.callback(p.requires_grad_, p.requires_grad)
            p.requires_grad_(id(p) in selected)
        stack.enter_context(eval_mode(student, teacher))
        if roi:
            stack.enter_context(sampled_regions(teacher, head_proposals, head_detections))
        for step in tqdm(range(steps), desc="distill", unit="step", disable=not progress):
            loss = _loss(student, teacher, next(batches), roi)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.step()
            losses.append(loss.item())
    n_affine, n_head = (sum(p.numel() for p in ps) for ps in (trained, head_parameters))
    logger.info("Distilled %d GN affine and %d head parameters in %d steps on %d images: "
                "loss %.4f -> %.4f.", n_affine, n_head, steps, len(items), losses[0], losses[-1])
    trained_heads = "weights" if head_parameters else "norms" if roi else "none"
    return DistillationResult(losses, n_affine + n_head, trained_heads)


def _parameters_to_train(student: nn.Module, teacher: nn.Module, heads: str) -> tuple:
    """Whether an R-CNN's ROI heads are distilled, the GN affines to train, and the head weights
    to train (``heads == "weights"``)."""
    detectron2 = is_detectron2_model(student)
    roi = heads != "none" and detectron2 and _has_roi_heads(student) and _has_roi_heads(teacher)
    parts = [student.backbone] if detectron2 else [student]
    if roi:
        parts += [m for m in (student.roi_heads.box_head,
                              getattr(student.roi_heads, "mask_head", None)) if m is not None]
    trained = [p for part in parts for m in part.modules()
               if isinstance(m, (ConvertedGroupNorm, ChannelAffine)) and getattr(m, "affine", True)
               for p in (m.weight, m.bias) if p.requires_grad]
    if not trained:
        raise ValueError("student has no trainable layers converted by gn_det to distill (those "
                         "converted from FrozenBN stay frozen); calibration fits those too")
    affine = set(map(id, trained))
    head_parameters = [p for part in parts[1:] if heads == "weights" for p in part.parameters()
                       if p.requires_grad and id(p) not in affine]
    return roi, trained, head_parameters


def _batches(items, batch_size: int, generator: torch.Generator):
    """Endless batches of ``batch_size`` items drawn without replacement, reshuffled every pass."""
    order: List[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(len(items), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        yield items[chosen] if isinstance(items, torch.Tensor) else [items[i] for i in chosen]


def _loss(student: nn.Module, teacher: nn.Module, batch, roi: bool) -> torch.Tensor:
    if is_detectron2_model(student):
        images = student.preprocess_image(batch)
        with torch.no_grad():
            features = teacher.backbone(images.tensor)
            regions = teacher_regions(teacher, images, features) if roi else None
            target = _detector_outputs(teacher, features, regions)
        output = _detector_outputs(student, student.backbone(images.tensor), regions)
    else:
        with torch.no_grad():
            target = _module_outputs(teacher, batch)
        output = _module_outputs(student, batch)
    return _relative_error(output, target)
