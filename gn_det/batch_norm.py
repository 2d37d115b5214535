"""The BatchNorm family in gn_det's registries: how each is read into a :class:`NormState`
(sources: BN 1d/2d/3d, SyncBN, detectron2's NaiveSyncBatchNorm and FrozenBatchNorm2d,
torchvision's FrozenBatchNorm2d) and built from one (targets ``"FrozenBN"``, ``"BN"``,
``"SyncBN"``, ``"naiveSyncBN"``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from .registry import NORM_SOURCES, NORM_TARGETS, NormState

if TYPE_CHECKING:
    from .convert import NormSpec

__all__ = []


def _param_state(module: nn.Module, dims: Optional[int]) -> NormState:
    """Read torch's ``_BatchNorm`` (and subclasses with its attributes)."""
    affine_trainable = [p.requires_grad for p in (module.weight, module.bias) if p is not None]
    return NormState(
        num_features=module.num_features,
        eps=module.eps,
        weight=module.weight,
        bias=module.bias,
        running_mean=module.running_mean,
        running_var=module.running_var,
        num_batches_tracked=module.num_batches_tracked,
        momentum=module.momentum,
        trainable=all(affine_trainable) if affine_trainable else True,
        dims=dims,
    )


def _reader(dims: Optional[int]):
    return lambda module: _param_state(module, dims)


# The spatial rank each type expects (None: any). detectron2.layers.BatchNorm2d is torch's own;
# lazy modules are refused by convert_norm while uninitialised.
for _types, _dims in (((nn.BatchNorm1d, nn.LazyBatchNorm1d), 1),
                      ((nn.BatchNorm2d, nn.LazyBatchNorm2d, NaiveSyncBatchNorm), 2),
                      ((nn.BatchNorm3d, nn.LazyBatchNorm3d), 3),
                      ((nn.SyncBatchNorm,), None)):
    for _type in _types:
        NORM_SOURCES.register(_type)(_reader(_dims))


@NORM_SOURCES.register(TorchvisionFrozenBatchNorm2d, name="torchvision.FrozenBatchNorm2d")
@NORM_SOURCES.register(FrozenBatchNorm2d)
def _frozen_state(module: nn.Module) -> NormState:
    return NormState(
        num_features=module.weight.numel(),
        eps=module.eps,
        weight=module.weight,
        bias=module.bias,
        running_mean=module.running_mean,
        running_var=module.running_var,
        momentum=0.1,
        trainable=False,
        dims=2,
    )


@torch.no_grad()
def _copy_bn_state(state: NormState, target: nn.Module) -> nn.Module:
    """Copy a NormState into a BN-family module (parameters or buffers alike)."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        value, slot = getattr(state, name), getattr(target, name, None)
        if value is None or slot is None:
            continue
        slot.copy_(value)
    for name in ("weight", "bias"):
        param = getattr(target, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(state.trainable)
    return target


def _batch_norm_kwargs(state: NormState, spec: NormSpec) -> dict:
    return {
        "eps": state.eps if spec.eps is None else spec.eps,
        "momentum": state.momentum,
        "affine": True,
        "track_running_stats": True,
        **state.factory_kwargs,
    }


@NORM_TARGETS.register("FrozenBN", produces=(FrozenBatchNorm2d, TorchvisionFrozenBatchNorm2d))
def _build_frozen_bn(state: NormState, spec: NormSpec, layer_name: str) -> nn.Module:
    if state.dims not in (2, None):
        raise ValueError(
            f"'{layer_name}': FrozenBN is 2d only (N, C, H, W); a {state.dims}d BatchNorm "
            "cannot become one"
        )
    eps = state.eps if spec.eps is None else spec.eps
    frozen = FrozenBatchNorm2d(state.num_features, eps=eps).to(**state.factory_kwargs)
    return _copy_bn_state(dataclasses.replace(state, num_batches_tracked=None), frozen)


@NORM_TARGETS.register("BN", produces=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
def _build_batch_norm(state: NormState, spec: NormSpec, layer_name: str) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: nn.BatchNorm2d}
    bn = cls[state.dims](state.num_features, **_batch_norm_kwargs(state, spec))
    return _copy_bn_state(state, bn)


@NORM_TARGETS.register("SyncBN", produces=(nn.SyncBatchNorm,))
def _build_sync_batch_norm(state: NormState, spec: NormSpec, layer_name: str):
    bn = nn.SyncBatchNorm(state.num_features, **_batch_norm_kwargs(state, spec))
    return _copy_bn_state(state, bn)


@NORM_TARGETS.register("naiveSyncBN", produces=(NaiveSyncBatchNorm,))
def _build_naive_sync_batch_norm(state: NormState, spec: NormSpec, layer_name: str):
    if state.dims not in (2, None):
        raise ValueError(f"'{layer_name}': detectron2's NaiveSyncBatchNorm is 2d only")
    bn = NaiveSyncBatchNorm(state.num_features, **_batch_norm_kwargs(state, spec))
    return _copy_bn_state(state, bn)
