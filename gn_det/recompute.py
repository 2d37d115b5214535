"""Recompute conv + GroupNorm in backward instead of storing the norm's input.

GroupNorm's backward needs its input, which is the conv's output: a full-resolution activation
that FrozenBN (an affine, whose backward needs only its weight) never keeps. At 1–2
high-resolution images per GPU these tensors are what limits training. :func:`enable_recompute`
makes every detectron2 ``Conv2d`` whose ``norm`` is a GroupNorm run conv → norm → its activation
under activation checkpointing, so backward keeps only the conv's input and recomputes the rest.
What it saves and costs is measured in docs/benchmarks.md ("Recomputing conv+GN in backward",
and the norm variants' memory and time: ``tools/benchmark_recompute.py``,
``tools/benchmark_norms.py``).

Why ``torch.utils.checkpoint`` (non-reentrant) and not a hand-written ``autograd.Function``:
measured on a converted ResNet-18 + FPN (2×3×256×256), both keep exactly the same tensors
(0.40× the activation bytes of plain GN) at the same cost (+20% forward + backward time). The
checkpoint runs detectron2's own ``Conv2d.forward`` unchanged, so any GroupNorm subclass and any
activation work, and autocast replay and parameters that need gradients while the input does not
(a trainable layer fed by a frozen stage or the image) are PyTorch's maintained code, not ours.

The layer's class is swapped for :class:`RecomputeConv2d`, a subclass that adds no parameters,
buffers or submodules: module names and ``state_dict`` keys are unchanged, so checkpoints
saved with recompute on load into plain detectron2 models and the other way round.
"""

from __future__ import annotations

import logging

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["RecomputeConv2d", "enable_recompute", "disable_recompute"]

logger = logging.getLogger(__name__)


class RecomputeConv2d(Conv2d):
    """
    detectron2 ``Conv2d`` that recomputes conv + GroupNorm (+ activation) in backward.

    Computes exactly what ``Conv2d`` computes. It checkpoints only when that saves memory and
    changes nothing else: in training mode, with gradients enabled, when something upstream or
    in the layer needs a gradient, and when ``norm`` is a GroupNorm. Otherwise (eval, ``no_grad``,
    a frozen layer fed by a frozen input, another norm) it is the plain forward.

    Norm forward hooks run twice per step (forward and recompute), as under any checkpointing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._recomputes(x):
            return super().forward(x)
        # conv + GroupNorm + detectron2's activations draw no random numbers: no RNG stash.
        return checkpoint(Conv2d.forward, self, x, use_reentrant=False, preserve_rng_state=False)

    def _recomputes(self, x: torch.Tensor) -> bool:
        return (
            self.training
            and torch.is_grad_enabled()
            and isinstance(self.norm, nn.GroupNorm)
            and x.numel() > 0
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        )


def enable_recompute(model: nn.Module) -> int:
    """
    Make every detectron2 ``Conv2d`` in ``model`` whose ``norm`` is a GroupNorm recompute in
    backward.

    In place (the layer's class becomes :class:`RecomputeConv2d`; ``model`` itself may be such a
    conv); parameters, buffers, names and ``state_dict`` are untouched. Idempotent. Call it after
    norm conversion: a conv whose norm is not yet a GroupNorm is left alone. Subclasses of
    ``Conv2d`` are left alone too (their ``forward`` may differ); a warning names them.

    Returns:
        The number of layers in ``model`` that recompute (already enabled ones included).
    """
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Conv2d) or not isinstance(module.norm, nn.GroupNorm):
            continue
        if type(module) is Conv2d:
            module.__class__ = RecomputeConv2d
        elif not isinstance(module, RecomputeConv2d):
            logger.warning(
                "Not recomputing '%s': %s is a subclass of detectron2's Conv2d, whose forward "
                "may differ.", name or type(module).__name__, type(module).__name__,
            )
            continue
        count += 1
    logger.info("Recomputing conv + GroupNorm in backward for %d layers.", count)
    return count


def disable_recompute(model: nn.Module) -> int:
    """Undo :func:`enable_recompute` in place; returns the number of layers restored."""
    count = 0
    for module in model.modules():
        if type(module) is RecomputeConv2d:
            module.__class__ = Conv2d
            count += 1
    return count
