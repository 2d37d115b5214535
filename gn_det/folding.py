"""Train with GN, deploy without its cost: GroupNorm folded into the convolutions for inference.

Each GroupNorm becomes a fixed per-channel affine (statistics pooled over calibration images),
distilled against the GN model, and folded into the detectron2 ``Conv2d`` before it. The steps,
and what they cost in AP: docs/deployment.md.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .inputs import eval_mode, forward_images, replace_module
from .layers import ChannelAffine
from .prefixes import as_prefixes, selected
from .standardization import unstandardize_weights

__all__ = ["ChannelAffine", "FOLD_PLAN_KEY", "FoldReport", "fold_for_inference", "fold_into_convs",
           "fold_plan", "folded_architecture", "group_statistics"]

logger = logging.getLogger(__name__)

#: Where a folded model keeps its :func:`fold_plan` (an attribute) and its checkpoint (metadata).
FOLD_PLAN_KEY = "fold_plan"
NOT_FOLDED = "MODEL.NORM_CONVERSION.FOLDED False"


def fold_plan(exclude: Sequence[str] = (), include: Sequence[str] = ()) -> str:
    """What a fold kept as GroupNorm, as the config keys that build its structure say it."""
    return (f"MODEL.NORM_CONVERSION.FOLDED True FOLDED_EXCLUDE {sorted(set(exclude))}"
            + (f" (folding only {sorted(set(include))})" if include else ""))


def fold_plan_metadata(model: nn.Module) -> dict:
    """What a checkpoint of ``model`` records of its fold: ``{FOLD_PLAN_KEY: plan}``, or ``{}``."""
    plan = getattr(model, FOLD_PLAN_KEY, None)
    return {FOLD_PLAN_KEY: plan} if plan else {}


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold_for_inference` did, layer by layer (``rows``: name, what it was, what it
    became: ``"folded into the conv"``, ``"affine (no conv before it)"``, ``"kept as GN"``)."""

    rows: List[Tuple[str, str, str]]
    statistics: str  # "N images" or "data-free (mean 0, variance 1)"
    distillation: Optional[object] = None  # gn_det.DistillationResult

    def counts(self) -> Dict[str, int]:
        return dict(collections.Counter(what for _, _, what in self.rows))


def _group_norms(model: nn.Module, include: Tuple[str, ...],
                 exclude: Tuple[str, ...]) -> Dict[str, nn.GroupNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.GroupNorm) and m.affine
            and selected(name, include, exclude)}


def _conv_norms(model: nn.Module) -> dict:
    """The detectron2 ``Conv2d`` layers of ``model`` by the name of their norm."""
    from detectron2.layers import Conv2d

    return {f"{n}.norm": m for n, m in model.named_modules() if isinstance(m, Conv2d)}


def group_statistics(
    model: nn.Module, images, layers: Dict[str, nn.GroupNorm]
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean and variance of each group of its input, pooled over every pixel
    (and region) of every image: ``{name: (mean (G,), variance (G,))}`` in float64."""
    sums = {name: torch.zeros(3, gn.num_groups, dtype=torch.float64) for name, gn in layers.items()}

    def hook(module, inputs, name):
        x = inputs[0].detach()
        if x.numel() == 0:
            return
        grouped = x.reshape(x.shape[0], module.num_groups, -1).double()
        s = sums[name].to(x.device)
        s[0] += grouped.shape[0] * grouped.shape[2]
        s[1] += grouped.sum((0, 2))
        s[2] += grouped.pow(2).sum((0, 2))
        sums[name] = s

    with contextlib.ExitStack() as stack:
        for name, gn in layers.items():
            stack.callback(gn.register_forward_pre_hook(functools.partial(hook, name=name)).remove)
        stack.enter_context(eval_mode(model))
        forward_images(model, images)
    stats = {}
    for name, (n, s, ss) in sums.items():
        if n[0] == 0:  # the layer never ran on these images (a head with no detections)
            continue
        mean = s / n
        stats[name] = (mean, (ss / n - mean * mean).clamp_min(0))
    return stats


def _affine_from(gn: nn.GroupNorm, mean: torch.Tensor, variance: torch.Tensor) -> ChannelAffine:
    per_group = gn.num_channels // gn.num_groups
    mean_c = mean.repeat_interleave(per_group).to(gn.weight)
    scale = (gn.weight.detach()
             / (variance.repeat_interleave(per_group) + gn.eps).sqrt().to(gn.weight))
    return ChannelAffine(gn.num_channels, scale, gn.bias.detach() - scale * mean_c,
                         source=type(gn).__name__)


def fold_into_convs(model: nn.Module, names: Iterable[str]) -> Dict[str, str]:
    """Fold each :class:`ChannelAffine` named in ``names`` that is a detectron2 ``Conv2d``'s
    norm into that convolution; returns ``{name: what it became}``."""
    holders = _conv_norms(model)
    result = {}
    unstandardize_weights(model)  # a GN+WS model: the convs' weights become Ŵ first
    for name in names:
        conv = holders.get(name)
        affine = model.get_submodule(name)
        if conv is None or not isinstance(affine, ChannelAffine):
            result[name] = "affine (no conv before it)"
            continue
        with torch.no_grad():
            a, c = affine.weight.detach(), affine.bias.detach()
            conv.weight.mul_(a.view(-1, *([1] * (conv.weight.dim() - 1))))
            bias = c if conv.bias is None else conv.bias.detach() * a + c
            conv.bias = nn.Parameter(bias.clone(), requires_grad=conv.weight.requires_grad)
        conv.norm = None
        result[name] = "folded into the conv"
    return result


def fold_for_inference(model: nn.Module, images=None, *, include: Sequence[str] = (),
                       exclude: Sequence[str] = (), distill_steps: int = 100,
                       distill_heads: str = "weights", batch_size: int = 4,
                       progress: bool = True) -> Tuple[nn.Module, FoldReport]:
    """
    A copy of ``model`` whose GroupNorm layers are fixed per-channel affines, distilled against
    ``model`` and folded into their convolutions (docs/deployment.md); ``model`` is unchanged.

    Args:
        model: a model with ``nn.GroupNorm`` layers (converted or native), in any mode.
        images: calibration images as ``gn_det.calibrate`` takes them (detectron2 input dicts,
            image tensors, or batch tensors for a plain module); None: data-free statistics
            (mean 0, variance 1: GN's affine alone, right only for standardised inputs) and no
            distillation.
        include, exclude: module-name prefixes of the GN layers to fold (default all); the others
            stay GroupNorm.
        distill_steps: ``gn_det.distill`` steps after the statistics (0: none).
        distill_heads: ``gn_det.distill``'s ``heads`` for an R-CNN.
        batch_size: images per distillation step.

    Returns:
        The folded model (eval mode) and a :class:`FoldReport`.

    Raises:
        ValueError: ``model`` has no GroupNorm layer the prefixes select, or bad arguments.
    """
    from .distillation import distill

    if distill_steps < 0 or batch_size < 1:
        raise ValueError(f"distill_steps must be >= 0 and batch_size >= 1, got {distill_steps}, "
                         f"{batch_size}")
    include, exclude = as_prefixes(include, "include"), as_prefixes(exclude, "exclude")
    student = copy.deepcopy(model).eval()
    layers = _group_norms(student, include, exclude)
    if not layers:
        raise ValueError("the model has no GroupNorm layer with an affine to fold"
                         + (" among the included prefixes" if include or exclude else ""))
    if images is not None:
        stats = group_statistics(student, images, layers)
        statistics = f"{len(images) if hasattr(images, '__len__') else 'the'} images"
    else:
        stats, statistics = {}, "data-free (mean 0, variance 1)"
        logger.warning("Folding GroupNorm without images: each layer's statistics are taken as "
                       "mean 0 and variance 1 (its affine alone), right only where inputs are "
                       "standardised.")
    for name, gn in layers.items():
        mean, variance = stats.get(name, (torch.zeros(gn.num_groups, dtype=torch.float64),
                                          torch.ones(gn.num_groups, dtype=torch.float64)))
        replace_module(student, name, _affine_from(gn, mean.cpu(), variance.cpu()))
    result = None
    if images is not None and distill_steps > 0:
        result = distill(student, model, images, steps=distill_steps, batch_size=batch_size,
                         heads=distill_heads, progress=progress)
    outcome = fold_into_convs(student, layers)
    rows = [(name, type(layers[name]).__name__, outcome[name]) for name in layers]
    rows += [(n, type(m).__name__, "kept as GN") for n, m in student.named_modules()
             if isinstance(m, nn.GroupNorm)]
    report = FoldReport(rows, statistics, result)
    setattr(student, FOLD_PLAN_KEY, fold_plan(exclude, include))
    logger.info("Folded for inference: %s (statistics: %s).",
                ", ".join(f"{v} {k}" for k, v in report.counts().items()), statistics)
    return student.eval(), report


def folded_architecture(model: nn.Module, *, include: Sequence[str] = (),
                        exclude: Sequence[str] = ()) -> nn.Module:
    """Give ``model`` the structure :func:`fold_for_inference` leaves, in place, with no weights
    computed: each selected GroupNorm that is a detectron2 ``Conv2d``'s norm is removed and the
    convolution gets a bias; any other selected GroupNorm becomes a :class:`ChannelAffine`. A
    folded checkpoint then loads into it with nothing missing, if its :func:`fold_plan` (the
    ``fold_plan`` attribute ``model`` gets) is the same. Returns ``model``."""
    include, exclude = as_prefixes(include, "include"), as_prefixes(exclude, "exclude")
    holders = _conv_norms(model)
    unstandardize_weights(model)
    for name, gn in _group_norms(model, include, exclude).items():
        conv = holders.get(name)
        if conv is None:
            replace_module(model, name, ChannelAffine(gn.num_channels, gn.weight, gn.bias,
                                                      source=type(gn).__name__))
            continue
        conv.norm = None
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels),
                                     requires_grad=conv.weight.requires_grad)
    setattr(model, FOLD_PLAN_KEY, fold_plan(exclude, include))
    return model
