"""GroupNorm folded stage by stage, for the fold study (``lab/tools/fold_study.py``).

``gn_det.folding.fold_for_inference`` goes from a GN model to the folded one in one call. The
study evaluates each stage on its own, so it takes the same steps apart, on gn_det's public
API (``gn_det.folding.group_statistics``, ``gn_det.folding.ChannelAffine``, ``gn_det.distill``):

1. :func:`affine_stage`: each selected GroupNorm becomes a fixed per-channel affine from its
   input's group statistics over the images (data-free: mean 0, variance 1), optionally
   distilled against the GN model: the model before folding;
2. :func:`fold_affines`: those affines folded, in place, into the detectron2 ``Conv2d`` before
   each (``W' = a W``, ``b' = a b + c``): the deployed model.

Both stages in a row compute what ``fold_for_inference`` with the same arguments computes
(``lab/tests/test_folding_stages.py``).
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

__all__ = ["affine_stage", "fold_affines", "kept_as_gn", "layer_counts"]


def _inside(name: str, prefixes: Sequence[str]) -> bool:
    """True if ``name`` is one of ``prefixes`` or inside one (``"a.b"`` is inside ``"a"``)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def affine_stage(
    model: nn.Module,
    images=None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    distill_steps: int = 100,
    distill_heads: str = "weights",
    batch_size: int = 4,
    progress: bool = False,
) -> Tuple[nn.Module, Dict[str, str]]:
    """A copy of ``model`` (eval mode) whose GroupNorm layers (those inside ``include``, all by
    default, and not inside ``exclude``: module-name prefixes) are fixed per-channel affines,
    distilled ``distill_steps`` steps against ``model`` when there are ``images``; and
    ``{name: what it is}`` for every norm layer it kept or replaced (``"affine (not folded)"``
    or ``"kept as GN"``). ``model`` is not modified."""
    from gn_det import distill
    from gn_det.folding import ChannelAffine, group_statistics

    student = copy.deepcopy(model).eval()
    layers = {
        name: m
        for name, m in student.named_modules()
        if isinstance(m, nn.GroupNorm)
        and m.affine
        and (not include or _inside(name, include))
        and not _inside(name, exclude)
    }
    if not layers:
        raise ValueError(
            "the model has no GroupNorm layer with an affine to fold among the prefixes chosen"
        )
    stats = group_statistics(student, images, layers) if images is not None else {}
    for name, gn in layers.items():
        mean, variance = stats.get(
            name,
            (
                torch.zeros(gn.num_groups, dtype=torch.float64),
                torch.ones(gn.num_groups, dtype=torch.float64),
            ),
        )
        per_group = gn.num_channels // gn.num_groups
        scale = gn.weight.detach() / (
            variance.cpu().repeat_interleave(per_group) + gn.eps
        ).sqrt().to(gn.weight)
        shift = gn.bias.detach() - scale * mean.cpu().repeat_interleave(per_group).to(gn.weight)
        _replace(
            student, name, ChannelAffine(gn.num_channels, scale, shift, source=type(gn).__name__)
        )
    if images is not None and distill_steps > 0:
        distill(
            student,
            model,
            images,
            steps=distill_steps,
            batch_size=batch_size,
            heads=distill_heads,
            progress=progress,
        )
    return student.eval(), {
        **{name: "affine (not folded)" for name in layers},
        **kept_as_gn(student),
    }


def kept_as_gn(model: nn.Module) -> Dict[str, str]:
    """``{name: "kept as GN"}`` for every GroupNorm of ``model``."""
    return {name: "kept as GN" for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


def fold_affines(model: nn.Module) -> Dict[str, str]:
    """Fold, in place, every ``ChannelAffine`` of ``model`` that is a detectron2 ``Conv2d``'s norm
    into that convolution (the conv gets a bias and no norm); returns ``{name: what it became}``
    for every affine: ``"folded into the conv"`` or ``"affine (no conv before it)"``."""
    from gn_det.folding import ChannelAffine, fold_into_convs

    return fold_into_convs(model, [n for n, m in model.named_modules()
                                   if isinstance(m, ChannelAffine)])


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every detectron2 ``FrozenBatchNorm2d`` that is a ``Conv2d``'s norm into the
    convolution, in place (the inference form of a FrozenBN detector: the timing study's
    reference); returns how many."""
    from detectron2.layers import Conv2d, FrozenBatchNorm2d
    from gn_det.folding import ChannelAffine

    for conv in model.modules():
        if isinstance(conv, Conv2d) and isinstance(conv.norm, FrozenBatchNorm2d):
            frozen = conv.norm
            scale = frozen.weight * (frozen.running_var + frozen.eps).rsqrt()
            conv.norm = ChannelAffine(frozen.num_features, scale,
                                      frozen.bias - frozen.running_mean * scale)
    return sum(1 for what in fold_affines(model).values() if what == "folded into the conv")


def layer_counts(outcome: Dict[str, str]) -> Dict[str, int]:
    """How many layers became what (the study's ``layers`` column), from ``{name: what}``."""
    found: Dict[str, int] = {}
    for what in outcome.values():
        found[what] = found.get(what, 0) + 1
    return found
