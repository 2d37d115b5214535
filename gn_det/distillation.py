"""Feature distillation of converted GroupNorm layers' affine parameters (and R-CNN head weights).

The alternative to :func:`gn_det.calibrate`'s per-layer least squares: train the (γ, β) of the
converted GN layers so that the network's *outputs* match the BN teacher's on unlabeled images:

    min_{γ, β}  Σ_outputs  ‖f_student(x) − f_teacher(x)‖² / ‖f_teacher(x) − mean_c‖²

(relative squared error per output; mean_c the per-channel mean over the batch). The outputs
are, for a plain ``nn.Module``, what it returns; for a detectron2 model, its backbone's (FPN)
levels and, for an R-CNN with ``StandardROIHeads``, also the box head's output on the teacher's
top RPN proposals and the mask head's logits on the teacher's top detections, each computed
from the student's own features. Least squares matches each layer on its own; this trains the
layers together for what the heads (and the predictors) see.

In the ROI heads, GN normalises each region on its own: a region's overall activation level,
which BN's fixed statistics keep and the layers after it read, is gone, and no per-channel
affine brings it back. So for such an R-CNN the weights of the box head and the mask head (its
convolutions, fully connected layers, the mask head's deconvolution and predictor) are trained
too, by default: on the shapes detector this kept 97.6 % of the teacher's box and mask AP,
against 94 % with the GN affine alone (docs/benchmarks.md). Everything else in the student
(backbone and FPN convolutions, RPN, box predictor) is left as it is (requires_grad flags
restored); the teacher runs in eval mode without gradients and is never modified.

Cost: ``steps`` × (teacher inference + student forward and backward) of ``batch_size`` images;
memory is one training step's activations at ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from typing import Iterable, List

import torch
from torch import nn
from tqdm import tqdm

from .inputs import (heads_run_on_features, input_items, is_detectron2_model, sampled_regions,
                     teacher_regions)
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


def distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Iterable,
    *,
    steps: int = 100,
    lr: float = 0.01,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    head_proposals: int = 100,
    head_detections: int = 16,
    heads: str = "weights",
    head_lr: float = 1e-3,
) -> DistillationResult:
    """
    Train the affine of ``student``'s converted GN layers (and an R-CNN's ROI-head weights) so
    that its outputs match ``teacher``'s (module doc). Adam, cosine-decayed learning rates.
    The fixed affines of ``gn_det.fold_for_inference`` (:class:`gn_det.folding.ChannelAffine`)
    train the same way, against the GN model they came from.

    Args:
        student: a model converted by ``gn_det.convert_norm`` from ``teacher`` (typically after
            ``stats`` transfer and :func:`gn_det.calibrate`, whose fit it starts from).
        teacher: the BN model, run in eval mode; never modified (modes restored).
        inputs: as for :func:`gn_det.calibrate` (:mod:`gn_det.inputs`).
        steps: optimisation steps, each on ``batch_size`` images drawn without replacement
            (reshuffled every pass over the inputs) from a generator seeded by ``seed``.
        lr: Adam's initial learning rate of the GN affine.
        head_proposals, head_detections: for detectron2 R-CNNs (StandardROIHeads), the box
            and mask heads are distilled too, on the teacher's top RPN proposals and top
            detections per image (as in :func:`gn_det.calibrate`).
        heads: for such an R-CNN: ``"weights"`` (default) trains the heads' GN affine and
            every weight (at ``head_lr``); ``"norms"`` their GN affine only; ``"none"`` the
            backbone alone, on its outputs (for untrained heads). No effect on other models.

    Returns:
        The loss before each step. Frozen parameters (``requires_grad`` False) are not trained.
        Deterministic for a seed on a deterministic device.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {', '.join(HEADS)}, got {heads!r}")
    items = input_items(student, inputs)
    if len(items) == 0:
        raise ValueError("distill needs at least one input image")
    roi, trained, head_parameters = _parameters_to_train(student, teacher, heads)
    flags = {p: p.requires_grad for p in student.parameters()}
    modes = student.training, teacher.training
    selected = set(map(id, trained + head_parameters))
    for p in student.parameters():
        p.requires_grad_(id(p) in selected)
    student.eval(), teacher.eval()
    groups = [{"params": trained, "lr": lr, "initial_lr": lr}]
    if head_parameters:
        groups.append({"params": head_parameters, "lr": head_lr, "initial_lr": head_lr})
    optimizer = torch.optim.Adam(groups)
    batches = _batches(items, batch_size, torch.Generator().manual_seed(seed))
    losses = []
    caps = sampled_regions(teacher, head_proposals, head_detections) if roi else nullcontext()
    try:
        with caps:
            for step in tqdm(range(steps), desc="distill", unit="step", disable=not progress):
                loss = _loss(student, teacher, next(batches), roi)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
                optimizer.step()
                losses.append(loss.item())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        student.train(modes[0]), teacher.train(modes[1])
    n_affine, n_head = (sum(p.numel() for p in ps) for ps in (trained, head_parameters))
    logger.info("Distilled %d GN affine and %d head parameters in %d steps: loss %.4f -> %.4f.",
                n_affine, n_head, steps, losses[0], losses[-1])
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
        raise ValueError("student has no trainable layers converted by gn_det to distill")
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
    """The relative error of the student's outputs against the teacher's on one batch."""
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
