"""Norm conversion for detectron2's LazyConfig (Python) configs: :func:`with_norm_conversion`
wraps ``cfg.model`` so that ``instantiate`` builds detectron2's model unchanged and then converts
it (docs/configs.md, "LazyConfigs"; configs/lazy/ has examples). The options stay editable by path
(``model.num_groups=16``); the original model config is under ``model.model``."""

from __future__ import annotations

from typing import Optional, Sequence

from detectron2.config import LazyCall
from torch import nn

from .convert import NormSpec, convert_norm
from .recompute import enable_recompute

__all__ = ["build_converted_model", "with_norm_conversion"]


def build_converted_model(model: nn.Module, target: str = "GN", num_groups: int = 32,
                          dim_per_group: Optional[int] = None, eps: Optional[float] = None,
                          transfer: str = "stats", include: Sequence[str] = (),
                          exclude: Sequence[str] = (), recompute: bool = False,
                          weight_standardization: bool = False) -> nn.Module:
    """``model`` (already built by ``instantiate``) with its norms converted (``convert_norm``,
    GN + WS with ``weight_standardization``) and, with ``recompute``, conv+GN recomputed in
    backward (``enable_recompute``)."""
    model = convert_norm(model, target, num_groups=num_groups, dim_per_group=dim_per_group,
                         eps=eps, transfer=transfer, include=tuple(include), exclude=tuple(exclude),
                         weight_standardization=weight_standardization)
    if recompute:
        enable_recompute(model)
    return model


def with_norm_conversion(model_config, **options):
    """A LazyConfig model node that instantiates to ``model_config``'s model, converted with
    ``options``, :func:`build_converted_model`'s (``target``, ``num_groups``, ...): checked now,
    so that a typo fails when the config loads, not after the model is built."""
    NormSpec(**{k: v for k, v in options.items() if k != "recompute"})
    return LazyCall(build_converted_model)(model=model_config, **options)
