"""Registries of the norm types conversion reads (sources) and builds (targets).

Both are keyed the way their users think. Sources are keyed by *type*, because conversion meets
module instances: the lookup walks the instance's MRO, so a subclass of a registered norm (a
custom ``MyBN(nn.BatchNorm2d)``) converts without registration, and registering the subclass
overrides it. fvcore's ``Registry`` maps names to objects and would need a type-to-name step on
every lookup, so this is a small typed mapping instead. Targets are keyed by the names configs use
(detectron2's ``get_norm`` vocabulary: ``"GN"``, ``"FrozenBN"``, ``"BN"``, ``"SyncBN"``,
``"naiveSyncBN"``).

Every source is read into one neutral :class:`NormState`, and every target is built from it, so
N sources and M targets need N + M functions, not N × M.

Registering a custom norm type::

    @gn_det.NORM_CONVERTERS.register(MyNorm)
    def _read_my_norm(module: MyNorm) -> gn_det.NormState:
        return gn_det.NormState(num_features=module.c, eps=module.eps, weight=module.g, ...)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Iterator, Optional, Tuple, Type

import torch
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from .groups import resolve_num_groups
from .layers import ConvertedGroupNorm

__all__ = [
    "NormState",
    "NORM_CONVERTERS",
    "NORM_TARGETS",
    "TargetOptions",
    "SourceRegistry",
    "TargetRegistry",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class NormState:
    """
    What any BatchNorm-family layer holds, in one neutral form.

    Attributes:
        num_features: channels C.
        eps: the layer's eps.
        weight, bias: affine γ, β (C,), or ``None`` without an affine.
        running_mean, running_var: population statistics (C,), or ``None`` when not tracked.
        num_batches_tracked: BN's counter, or ``None``.
        momentum: BN's momentum (``None`` = cumulative average), for BN targets.
        trainable: whether the affine is trained; ``False`` for FrozenBN and for BN whose
            parameters have ``requires_grad=False`` (detectron2's frozen stages).
        dims: spatial rank of the input the layer expects (1d, 2d, 3d: 1, 2, 3), ``None`` if any.
        source: name of the layer's type, filled in by conversion for reports.
    """

    num_features: int
    eps: float
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor] = None
    momentum: Optional[float] = 0.1
    trainable: bool = True
    dims: Optional[int] = 2
    source: str = ""

    @property
    def reference(self) -> torch.Tensor:
        """A tensor of the layer, whose device and dtype the new layer takes."""
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None:
                return t
        raise ValueError("norm layer has neither affine nor running statistics")


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    """Per-conversion options a target builder needs (validated by ``NormSpec``)."""

    num_groups: int = 32
    dim_per_group: Optional[int] = None
    eps: Optional[float] = None
    transfer: str = "stats"


SourceReader = Callable[[nn.Module], NormState]
TargetBuilder = Callable[[NormState, TargetOptions, str], nn.Module]


class SourceRegistry:
    """Norm type → function reading it into a :class:`NormState` (MRO-aware lookup)."""

    def __init__(self) -> None:
        self._readers: Dict[Type[nn.Module], SourceReader] = {}
        self._names: Dict[str, Type[nn.Module]] = {}

    def register(self, norm_type: Type[nn.Module], name: Optional[str] = None):
        """Decorator: register a reader for ``norm_type`` (and its subclasses), under ``name``."""

        def decorator(reader: SourceReader) -> SourceReader:
            self._readers[norm_type] = reader
            self._names[name or norm_type.__name__] = norm_type
            return reader

        return decorator

    def unregister(self, norm_type: Type[nn.Module]) -> None:
        """Remove ``norm_type``'s reader (and its name)."""
        del self._readers[norm_type]
        self._names = {n: t for n, t in self._names.items() if t is not norm_type}

    def lookup(self, module: nn.Module) -> Optional[SourceReader]:
        """The reader for ``module``'s type or its nearest registered base, else ``None``."""
        for cls in type(module).__mro__:
            if cls in self._readers:
                return self._readers[cls]
        return None

    def types_named(self, names) -> Tuple[Type[nn.Module], ...]:
        """Registered types for source names; ``ValueError`` listing valid names if unknown."""
        unknown = [n for n in names if n not in self._names]
        if unknown:
            raise ValueError(
                f"Unknown norm source(s) {unknown}; valid sources: {', '.join(self._names)}"
            )
        return tuple(self._names[n] for n in names)

    def names(self) -> Tuple[str, ...]:
        return tuple(self._names)

    def __contains__(self, norm_type) -> bool:
        return norm_type in self._readers

    def __iter__(self) -> Iterator[Type[nn.Module]]:
        return iter(self._readers)


class TargetRegistry:
    """Target name → (builder, the types that already are this target)."""

    def __init__(self) -> None:
        self._targets: Dict[str, Tuple[TargetBuilder, Tuple[type, ...]]] = {}

    def register(self, name: str, produces: Tuple[type, ...]):
        """Decorator: register ``builder(state, options, layer_name)`` for target ``name``.

        ``produces``: the exact module types that already are this target; conversion leaves
        them alone (exact, not isinstance: NaiveSyncBatchNorm subclasses BatchNorm2d).
        """

        def decorator(builder: TargetBuilder) -> TargetBuilder:
            self._targets[name] = (builder, tuple(produces))
            return builder

        return decorator

    def get(self, name: str) -> Tuple[TargetBuilder, Tuple[type, ...]]:
        if name not in self._targets:
            raise ValueError(f"Unknown norm target {name!r}; valid targets: {', '.join(self)}")
        return self._targets[name]

    def __contains__(self, name) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)


NORM_CONVERTERS = SourceRegistry()
NORM_TARGETS = TargetRegistry()


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


@NORM_CONVERTERS.register(nn.BatchNorm1d)
@NORM_CONVERTERS.register(nn.LazyBatchNorm1d)  # refused while uninitialised, by convert_norm
def _read_bn1d(module: nn.BatchNorm1d) -> NormState:
    return _param_state(module, dims=1)


@NORM_CONVERTERS.register(nn.BatchNorm2d)
@NORM_CONVERTERS.register(nn.LazyBatchNorm2d)  # refused while uninitialised, by convert_norm
def _read_bn2d(module: nn.BatchNorm2d) -> NormState:
    # detectron2.layers.BatchNorm2d is torch.nn.BatchNorm2d itself.
    return _param_state(module, dims=2)


@NORM_CONVERTERS.register(nn.BatchNorm3d)
@NORM_CONVERTERS.register(nn.LazyBatchNorm3d)  # refused while uninitialised, by convert_norm
def _read_bn3d(module: nn.BatchNorm3d) -> NormState:
    return _param_state(module, dims=3)


@NORM_CONVERTERS.register(nn.SyncBatchNorm)
def _read_sync_bn(module: nn.SyncBatchNorm) -> NormState:
    return _param_state(module, dims=None)


@NORM_CONVERTERS.register(NaiveSyncBatchNorm)
def _read_naive_sync_bn(module: NaiveSyncBatchNorm) -> NormState:
    return _param_state(module, dims=2)


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


@NORM_CONVERTERS.register(FrozenBatchNorm2d)
def _read_frozen_bn(module: FrozenBatchNorm2d) -> NormState:
    return _frozen_state(module)


@NORM_CONVERTERS.register(TorchvisionFrozenBatchNorm2d, name="torchvision.FrozenBatchNorm2d")
def _read_torchvision_frozen_bn(module: TorchvisionFrozenBatchNorm2d) -> NormState:
    return _frozen_state(module)


def _factory(state: NormState) -> dict:
    ref = state.reference
    return {"device": ref.device, "dtype": ref.dtype}


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


def _batch_norm_kwargs(state: NormState, options: TargetOptions) -> dict:
    return {
        "eps": state.eps if options.eps is None else options.eps,
        "momentum": state.momentum,
        "affine": True,
        "track_running_stats": True,
        **_factory(state),
    }


@NORM_TARGETS.register("GN", produces=(nn.GroupNorm, ConvertedGroupNorm))
def _build_group_norm(state: NormState, options: TargetOptions, layer_name: str) -> nn.Module:
    groups = resolve_num_groups(
        state.num_features, options.num_groups, options.dim_per_group, layer_name=layer_name
    )
    norm = ConvertedGroupNorm(
        groups,
        state.num_features,
        eps=state.eps if options.eps is None else options.eps,
        affine=state.weight is not None or state.bias is not None,
        transfer=options.transfer,
        source_eps=state.eps,
        source=state.source,
        **_factory(state),
    )
    if not norm.affine and options.transfer == "stats" and state.running_mean is not None:
        logger.info(
            "'%s': affine-free BatchNorm becomes affine-free GroupNorm; its running statistics "
            "have no GN counterpart to transfer into.",
            layer_name,
        )
    norm.load_bn_state(state.weight, state.bias, state.running_mean, state.running_var)
    if norm.affine:
        norm.weight.requires_grad_(state.trainable)
        norm.bias.requires_grad_(state.trainable)
    return norm


@NORM_TARGETS.register("FrozenBN", produces=(FrozenBatchNorm2d, TorchvisionFrozenBatchNorm2d))
def _build_frozen_bn(state: NormState, options: TargetOptions, layer_name: str) -> nn.Module:
    if state.dims not in (2, None):
        raise ValueError(
            f"'{layer_name}': FrozenBN is 2d only (N, C, H, W); a {state.dims}d BatchNorm "
            "cannot become one"
        )
    eps = state.eps if options.eps is None else options.eps
    frozen = FrozenBatchNorm2d(state.num_features, eps=eps).to(**_factory(state))
    return _copy_bn_state(dataclasses.replace(state, num_batches_tracked=None), frozen)


@NORM_TARGETS.register("BN", produces=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
def _build_batch_norm(state: NormState, options: TargetOptions, layer_name: str) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: nn.BatchNorm2d}
    bn = cls[state.dims](state.num_features, **_batch_norm_kwargs(state, options))
    return _copy_bn_state(state, bn)


@NORM_TARGETS.register("SyncBN", produces=(nn.SyncBatchNorm,))
def _build_sync_batch_norm(state: NormState, options: TargetOptions, layer_name: str):
    bn = nn.SyncBatchNorm(state.num_features, **_batch_norm_kwargs(state, options))
    return _copy_bn_state(state, bn)


@NORM_TARGETS.register("naiveSyncBN", produces=(NaiveSyncBatchNorm,))
def _build_naive_sync_batch_norm(state: NormState, options: TargetOptions, layer_name: str):
    if state.dims not in (2, None):
        raise ValueError(f"'{layer_name}': detectron2's NaiveSyncBatchNorm is 2d only")
    bn = NaiveSyncBatchNorm(state.num_features, **_batch_norm_kwargs(state, options))
    return _copy_bn_state(state, bn)
