"""Registries of the norm types conversion reads (sources) and builds (targets).

Sources are keyed by *type* and looked up along the instance's MRO (a subclass of a registered
norm converts without registration; fvcore's ``Registry`` maps names, not types); targets by the
names configs use (detectron2's ``get_norm`` vocabulary). Every source is read into one
:class:`NormState` and every target built from it: N + M functions, not N × M.

The built-in entries live beside what they read and build: the BatchNorm family in
:mod:`gn_det.batch_norm`, GroupNorm in :mod:`gn_det.layers`. Registering a custom norm type::

    @gn_det.NORM_SOURCES.register(MyNorm)
    def _read_my_norm(module: MyNorm) -> gn_det.NormState:
        return gn_det.NormState(num_features=module.c, eps=module.eps, weight=module.g, ...)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Tuple, Type

import torch
from torch import nn

if TYPE_CHECKING:
    from .convert import NormSpec

__all__ = [
    "NORM_SOURCES",
    "NORM_TARGETS",
    "NormState",
    "SourceRegistry",
    "TargetRegistry",
]


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
        input_affine: ``(a, c)``: the layer's input will be ``a · x + c`` per channel, once the
            conv before it is Weight-Standardised (``gn_det.standardization.ws_input_affine``),
            filled in by conversion; ``None``.
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
    input_affine: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @property
    def reference(self) -> torch.Tensor:
        """A tensor of the layer, whose device and dtype the new layer takes."""
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None:
                return t
        raise ValueError("norm layer has neither affine nor running statistics")

    @property
    def factory_kwargs(self) -> dict:
        """``device`` and ``dtype`` for the new layer: the source layer's."""
        return {"device": self.reference.device, "dtype": self.reference.dtype}


SourceReader = Callable[[nn.Module], NormState]
TargetBuilder = Callable[[NormState, "NormSpec", str], nn.Module]


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
        """Decorator: register ``builder(state, spec, layer_name)`` for target ``name``
        (``spec``: the :class:`gn_det.NormSpec` of the conversion).

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


NORM_SOURCES = SourceRegistry()
NORM_TARGETS = TargetRegistry()


def __getattr__(name: str):
    if name == "TargetOptions":
        from .convert import deprecated_target_options

        return deprecated_target_options
    if name == "NORM_CONVERTERS":
        from . import _deprecated

        return _deprecated.moved("gn_det.NORM_CONVERTERS", "gn_det.NORM_SOURCES", NORM_SOURCES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
