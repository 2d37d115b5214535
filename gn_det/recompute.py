"""Recompute conv + GroupNorm in backward instead of storing the norm's input (the conv's
full-resolution output): less memory, a slower step (lab/benchmarks.md, "Recomputing conv+GN in
backward"). Only a layer's class changes, so ``state_dict`` keys do not: checkpoints load either
way."""

from __future__ import annotations

import logging

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from .standardization import WS_CLASSES, WSConv2d

__all__ = ["RecomputeConv2d", "RecomputeWSConv2d", "enable_recompute", "disable_recompute"]

logger = logging.getLogger(__name__)


class RecomputeConv2d(Conv2d):
    """detectron2 ``Conv2d`` that recomputes conv + GroupNorm (+ activation) in backward.

    Computes exactly what ``Conv2d`` computes, under ``torch.utils.checkpoint`` only in training
    mode, with gradients enabled, when something upstream or in the layer needs a gradient, and
    when ``norm`` is a GroupNorm. Norm forward hooks then run twice a step (forward, recompute)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._recomputes(x):
            return super().forward(x)
        # conv + GroupNorm + detectron2's activations draw no random numbers: no RNG stash.
        return checkpoint(super().forward, x, use_reentrant=False, preserve_rng_state=False)

    def _recomputes(self, x: torch.Tensor) -> bool:
        return (self.training and torch.is_grad_enabled() and isinstance(self.norm, nn.GroupNorm)
                and x.numel() > 0
                and (x.requires_grad or any(p.requires_grad for p in self.parameters())))


class RecomputeWSConv2d(RecomputeConv2d, WSConv2d):
    """:class:`RecomputeConv2d` whose convolution is a :class:`gn_det.WSConv2d`'s: the weight's
    standardisation is recomputed in backward too."""


#: Recomputing class of each conv class that can recompute.
_RECOMPUTING = {Conv2d: RecomputeConv2d, WSConv2d: RecomputeWSConv2d}
WS_CLASSES[RecomputeConv2d] = RecomputeWSConv2d


def enable_recompute(model: nn.Module) -> int:
    """Make every detectron2 ``Conv2d`` in ``model`` whose ``norm`` is a GroupNorm recompute in
    backward, in place (its class becomes :class:`RecomputeConv2d`); idempotent. Returns the
    number of layers in ``model`` that recompute (already enabled ones included).

    Call it after norm conversion: a conv whose norm is not yet a GroupNorm is left alone.
    Subclasses of ``Conv2d`` are left alone too (their ``forward`` may differ), with a warning."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Conv2d) or not isinstance(module.norm, nn.GroupNorm):
            continue
        if type(module) in _RECOMPUTING:
            module.__class__ = _RECOMPUTING[type(module)]
        elif not isinstance(module, RecomputeConv2d):
            logger.warning("Not recomputing '%s': %s is a subclass of detectron2's Conv2d, whose "
                           "forward may differ.", name or type(module).__name__,
                           type(module).__name__)
            continue
        count += 1
    logger.info("Recomputing conv + GroupNorm in backward for %d layers.", count)
    return count


def disable_recompute(model: nn.Module) -> int:
    """Undo :func:`enable_recompute` in place; returns the number of layers restored."""
    count = 0
    for module in model.modules():
        restored = {v: k for k, v in _RECOMPUTING.items()}.get(type(module))
        if restored is not None:
            module.__class__ = restored
            count += 1
    return count
