"""Weight Standardization (Qiao et al. 2019) for the convolutions a GroupNorm normalises.

Each output channel's weight is standardised over its fan-in before the convolution,
``Ŵ_c = (W_c − mean(W_c)) / sqrt(var(W_c) + eps)``; with GN after it, the recipe for 1–2
images per GPU. Only a layer's class changes (detectron2 ``Conv2d`` → :class:`WSConv2d`), so
``state_dict`` keys do not, and checkpoints keep the raw weights ``W``. Why only convs before a
GroupNorm: WS fixes each channel's scale, which only a norm after it gives back.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch.autograd.function import once_differentiable
from torch import nn

from .prefixes import as_prefixes, selected

__all__ = ["WS_EPS", "WS_KEY", "WSConv2d", "standardizable", "standardize_weight",
           "standardize_weights", "unstandardize_weights", "weight_std", "ws_metadata"]

logger = logging.getLogger(__name__)

#: eps added to each channel's weight variance (relative to weights ~1/sqrt(fan-in) in size).
WS_EPS = 1e-5
#: Where a checkpoint of a GN + WS model says so (metadata, a string as safetensors keeps): its
#: raw weights compute another function in a model built without WS, with the same keys.
WS_KEY = "weight_standardization"
WS_PLAN = "MODEL.NORM_CONVERSION.WEIGHT_STANDARDIZATION True"
#: The class each conv class becomes with WS (gn_det.recompute adds its recomputing pair).
WS_CLASSES: Dict[type, type] = {}


def weight_std(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """``sqrt(var(W_c) + eps)`` per output channel, shape (C_out,), in float64: what WS divides
    channel ``c`` by (the biased variance over the fan-in)."""
    flat = weight.detach().double().reshape(weight.shape[0], -1)
    return (flat.var(dim=1, unbiased=False) + eps).sqrt()


def _standardized(flat: torch.Tensor, eps: float):
    """(Ŵ, 1/s) of a weight flattened to (C_out, fan-in), Ŵ in one pass: W·r − m·r."""
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    inv_std = (var + eps).rsqrt()
    return torch.addcmul(-mean * inv_std, flat, inv_std), inv_std


def ws_input_affine(weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    eps: float = WS_EPS) -> tuple:
    """``(a, c)`` such that a conv standardising ``weight`` outputs ``a · z + c`` for the plain
    conv's output ``z``, the weight mean set aside: ``a = 1/s``, ``c = b (1 − a)``
    (:func:`gn_det.transfer_bn_to_gn`'s ``input_affine``)."""
    a = weight_std(weight, eps).reciprocal()
    return a, None if bias is None else bias.detach().double() * (1 - a)


class _Standardize(torch.autograd.Function):
    """WS with a hand-written backward: two saved tensors, one fused expression each way,
    instead of autograd's graph through mean, subtraction, variance and division."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, eps: float) -> torch.Tensor:
        standardized, inv_std = _standardized(weight.reshape(weight.shape[0], -1), eps)
        ctx.save_for_backward(standardized, inv_std)
        return standardized.view_as(weight)

    @staticmethod
    @once_differentiable  # a second derivative is refused, not silently wrong
    def backward(ctx, grad: torch.Tensor):
        standardized, inv_std = ctx.saved_tensors
        g = grad.reshape(standardized.shape)
        # d/dW of (W − m)·r, r = (v + eps)^-1/2: r·(g − mean(g) − Ŵ·mean(g·Ŵ)), per channel,
        # as two fused passes over the weight: g·r − mean(g)·r, then − Ŵ·mean(g·Ŵ)·r.
        fan_in = g.shape[1]
        projection = torch.linalg.vecdot(g, standardized).unsqueeze(1) / fan_in
        result = torch.addcmul(-g.mean(dim=1, keepdim=True) * inv_std, g, inv_std)
        return result.addcmul_(standardized, projection * inv_std, value=-1).view_as(grad), None


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """``(W_c − mean(W_c)) / sqrt(var(W_c) + eps)`` for each output channel ``c`` of a conv
    weight (C_out, C_in/groups, *kernel), differentiable (a fused backward outside tracing)."""
    if torch.jit.is_tracing() or not torch.is_grad_enabled() or not weight.requires_grad:
        return _standardized(weight.reshape(weight.shape[0], -1), eps)[0].view_as(weight)
    return _Standardize.apply(weight, eps)


class WSConv2d(Conv2d):
    """detectron2 ``Conv2d`` that convolves with its standardised weight
    (:func:`standardize_weight`), then applies its ``norm`` and ``activation`` as ``Conv2d`` does.

    Its parameter ``weight`` stays the raw ``W`` (what the optimizer updates and checkpoints
    save). In eval mode without a gradient for ``W`` (inference), ``Ŵ`` is computed once and
    reused until ``W`` changes in place, moves, loads or the module switches to training and
    back (writes through ``.data``, and torch's fused optimizers, bump no version: a switch of
    mode is what makes them seen); a trace records the standardisation, so an exported model
    computes it (or its exporter folds it as a constant).
    A BatchNorm-format state for ``norm`` loaded into it is transferred with ``W``'s channel
    scales (:func:`ws_input_affine`; docs/transfer.md).
    """

    ws_eps: float = WS_EPS
    _ws_cache: Optional[tuple] = None

    def standardized_weight(self) -> torch.Tensor:
        weight = self.weight
        # Cached in eval mode only: an optimizer may change W in training without a version
        # bump (torch's fused AdamW does not count its in-place update).
        if (self.training or torch.jit.is_tracing() or weight.is_inference()
                or (torch.is_grad_enabled() and weight.requires_grad)):
            return standardize_weight(weight, self.ws_eps)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, self.ws_eps)
        if self._ws_cache is None or self._ws_cache[0] != key:
            # A normal tensor even under inference_mode: usable by a later training forward.
            with torch.inference_mode(False), torch.no_grad():
                self._ws_cache = (key, standardize_weight(weight.detach(), self.ws_eps))
        return self._ws_cache[1]

    def train(self, mode: bool = True):
        self._ws_cache = None  # writes through .data bump no version: a mode switch forgets
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._ws_cache = None  # .to(), .half(), ...: the weight may be new data at an old address
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                     self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        from .layers import ConvertedGroupNorm

        self._ws_cache = None
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        if (isinstance(self.norm, ConvertedGroupNorm) and torch.is_tensor(weight)
                and weight.shape == self.weight.shape):
            self.norm.absorb_bn_state(state_dict, prefix + "norm.", input_affine=ws_input_affine(
                weight, bias if torch.is_tensor(bias) else None, self.ws_eps))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_standardization=True"


WS_CLASSES[Conv2d] = WSConv2d


def ws_metadata(model: nn.Module) -> dict:
    """What a checkpoint of ``model`` records of WS: ``{WS_KEY: WS_PLAN}``, or ``{}``."""
    return {WS_KEY: WS_PLAN} if any(isinstance(m, WSConv2d) for m in model.modules()) else {}


def standardizable(module: nn.Module) -> bool:
    """Whether ``module`` is a detectron2 ``Conv2d`` that standardises its weight or can
    (gn_det's recomputing ones included); subclasses with a forward of their own cannot."""
    return type(module) in WS_CLASSES or type(module) in WS_CLASSES.values()


def standardize_weights(model: nn.Module, include: Sequence[str] = (),
                        exclude: Sequence[str] = ()) -> int:
    """Make every detectron2 ``Conv2d`` of ``model`` whose ``norm`` is a GroupNorm convolve
    with its standardised weight, in place (its class becomes :class:`WSConv2d`); idempotent.

    ``include`` / ``exclude``: module-name prefixes of the norms whose convs to standardise, as
    :class:`gn_det.NormSpec`'s. Weights are not changed: a GN model's checkpoint still loads,
    but computes another function until trained (WS removes each channel's weight mean).
    Returns the number of standardised convolutions in ``model`` (earlier ones included).
    """
    include, exclude = as_prefixes(include, "include"), as_prefixes(exclude, "exclude")
    count, skipped, held = 0, [], set()
    for name, module in model.named_modules():
        norm_name = f"{name}.norm" if name else "norm"
        if (not isinstance(module, Conv2d) or not isinstance(module.norm, nn.GroupNorm)
                or not selected(norm_name, include, exclude)):
            continue
        held.add(norm_name)
        if not standardizable(module):
            skipped.append(name)
            continue
        module.__class__ = WS_CLASSES.get(type(module), type(module))
        count += 1
    if skipped:
        logger.warning("Not standardising %d convolutions whose class has a forward of its own "
                       "(first: '%s', %s).", len(skipped), skipped[0],
                       type(model.get_submodule(skipped[0])).__name__)
    loose = [n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)
             and n not in held and selected(n, include, exclude)]
    if loose:  # torchvision's ResNet: conv and norm side by side, nothing pairs them
        logger.warning("%d GroupNorm layers are not the norm of a detectron2 Conv2d (first: "
                       "'%s'): the convs before them are not standardised.", len(loose), loose[0])
    logger.info("Weight Standardization on %d convolutions followed by GroupNorm.", count)
    return count


def unstandardize_weights(model: nn.Module) -> int:
    """Turn every :class:`WSConv2d` of ``model`` into the plain ``Conv2d`` that computes the
    same (its weight becomes ``Ŵ``), in place; returns how many. Folding starts here."""
    plain = {ws: conv for conv, ws in WS_CLASSES.items()}
    count = 0
    for module in model.modules():
        if isinstance(module, WSConv2d):
            with torch.no_grad():
                module.weight.copy_(standardize_weight(module.weight.detach(), module.ws_eps))
            module.__class__ = plain[type(module)]
            module.__dict__.pop("_ws_cache", None)
            count += 1
    return count
