"""Norm conversion for detectron2's LazyConfig (Python) configs.

In the LazyConfig idiom a config holds ``cfg.model``, a tree of ``LazyCall`` s that
``instantiate`` builds. :func:`with_norm_conversion` wraps it in one more ``LazyCall`` — of
:func:`build_converted_model` — so that ``instantiate(cfg.model)`` builds detectron2's model
unchanged and then converts it, with the options of ``MODEL.NORM_CONVERSION``::

    from detectron2.model_zoo import get_config
    from gn_det.lazy import with_norm_conversion

    _base = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
    dataloader, optimizer, lr_multiplier, train = (
        _base.dataloader, _base.optimizer, _base.lr_multiplier, _base.train)
    model = with_norm_conversion(_base.model, target="GN")

The wrapped model's options stay editable by path (``model.num_groups=16`` on the command
line); the original model config is under ``model.model``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from detectron2.config import LazyCall
from torch import nn

from .convert import NormSpec, convert_norm
from .recompute import enable_recompute

__all__ = ["build_converted_model", "with_norm_conversion"]


def build_converted_model(
    model: nn.Module,
    target: str = "GN",
    num_groups: int = 32,
    dim_per_group: Optional[int] = None,
    eps: Optional[float] = None,
    transfer: str = "stats",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    recompute: bool = False,
) -> nn.Module:
    """``model`` (already built by ``instantiate``) with its norms converted (``convert_norm``)
    and, with ``recompute``, conv+GN recomputed in backward (``enable_recompute``)."""
    model = convert_norm(
        model, target, num_groups=num_groups, dim_per_group=dim_per_group, eps=eps,
        transfer=transfer, include=tuple(include), exclude=tuple(exclude),
    )
    if recompute:
        enable_recompute(model)
    return model


def with_norm_conversion(model_config, **options):
    """A LazyConfig model node that instantiates to ``model_config``'s model, converted.

    ``options`` are :func:`build_converted_model`'s (``target``, ``num_groups``, ...); they are
    checked now, so a typo fails when the config loads, not after the model is built.
    """
    NormSpec(**{k: v for k, v in options.items() if k != "recompute"})
    return LazyCall(build_converted_model)(model=model_config, **options)
