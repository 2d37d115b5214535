"""Convert every BatchNorm-family layer of a module tree to GroupNorm (or another BN variant)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Optional, Tuple

from torch import nn
from torch.nn.parameter import is_lazy

from .groups import check_group_args, is_fallback
from .prefixes import Prefixes, as_prefixes, selected
from .registry import NORM_SOURCES, NORM_TARGETS
from .transfer import check_transfer

__all__ = ["NormSpec", "convert_norm"]

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class NormSpec:
    """
    What to convert, to what, and how — validated at construction.

    Attributes:
        target: ``"GN"`` or a BN-family target (``"FrozenBN"``, ``"BN"``, ``"SyncBN"``,
            ``"naiveSyncBN"``); see ``gn_det.NORM_TARGETS``.
        num_groups, dim_per_group: GN's groups (default 32, Wu & He 2018), or channels per
            group instead (``gn_det.resolve_num_groups``).
        eps: eps of the new layers; ``None`` keeps each source layer's eps.
        transfer: ``"stats"`` or ``"copy"`` (``gn_det.transfer``); GN targets only.
        include: module-name prefixes to convert (empty: everything).
        exclude: module-name prefixes to leave alone; wins over ``include``.
        sources: source names (``gn_det.NORM_SOURCES.names()``) to convert (empty: all).
        weight_standardization: GN targets only: every detectron2 ``Conv2d`` whose ``norm`` is
            a GroupNorm after conversion (converted or built as GN, within ``include`` /
            ``exclude``) standardises its weight (:class:`gn_det.WSConv2d`); BN state is then
            transferred with the conv's channel scales.
    """

    target: str = "GN"
    num_groups: int = 32
    dim_per_group: Optional[int] = None
    eps: Optional[float] = None
    transfer: str = "stats"
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    sources: Tuple[str, ...] = ()
    weight_standardization: bool = False

    def __post_init__(self):
        NORM_TARGETS.get(self.target)
        check_transfer(self.transfer)
        check_group_args(self.num_groups, self.dim_per_group)
        if self.eps is not None and not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps must be a positive number or None, got {self.eps!r}")
        object.__setattr__(self, "include", as_prefixes(self.include, "include"))
        object.__setattr__(self, "exclude", as_prefixes(self.exclude, "exclude"))
        sources = as_prefixes(self.sources, "sources")
        NORM_SOURCES.types_named(sources)
        object.__setattr__(self, "sources", sources)
        if self.weight_standardization and self.target != "GN":
            raise ValueError(f"weight standardization goes with target 'GN' (a norm after the "
                             f"conv that gives back its scale), not {self.target!r}")

    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether the layer ``name`` is one this spec converts (by name and by source type)."""
        if not selected(name, self.include, self.exclude):
            return False
        if self.sources:
            return isinstance(module, NORM_SOURCES.types_named(self.sources))
        return True


def convert_norm(
    module: nn.Module,
    target: str = "GN",
    *,
    num_groups: int = 32,
    dim_per_group: Optional[int] = None,
    eps: Optional[float] = None,
    transfer: str = "stats",
    include: Prefixes = None,
    exclude: Prefixes = None,
    sources: Prefixes = None,
    weight_standardization: bool = False,
) -> nn.Module:
    """
    Replace every BatchNorm-family layer in ``module`` by ``target``, transferring weights.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm`` and detectron2's
    ``FrozenBatchNorm2d.convert_frozen_batchnorm``: children are replaced in place and the
    (possibly new) root is returned, so call it as ``model = convert_norm(model)``. Each new layer
    takes its source's device, dtype, training mode and trainability (a FrozenBN, or a BN whose
    affine has ``requires_grad=False``, becomes a GN with ``requires_grad=False``). Layers that
    already are the target, and norm types not in ``gn_det.NORM_SOURCES``, are left alone,
    so converting twice changes nothing.

    The options are :class:`NormSpec`'s (``module`` may itself be a norm layer); ``transfer``
    ``"stats"`` uses the BN running statistics, ``"copy"`` γ and β only (what detectron2 does).
    ``weight_standardization`` makes the target GN + Weight Standardization (docs/transfer.md,
    "GN + WS"). A summary is logged; ``gn_det.describe_norms`` tabulates the layers afterwards.

    Raises:
        ValueError: unknown target, transfer or source name, or bad group/eps values.
    """
    spec = NormSpec(target=target, num_groups=num_groups, dim_per_group=dim_per_group, eps=eps,
                    transfer=transfer, include=include, exclude=exclude, sources=sources,
                    weight_standardization=weight_standardization)
    return convert_norm_by_spec(module, spec)


def convert_norm_by_spec(module: nn.Module, spec: NormSpec) -> nn.Module:
    """:func:`convert_norm` with a ready :class:`NormSpec`."""
    counts: collections.Counter = collections.Counter()
    fallbacks: list = []
    converted = _convert(module, "", spec, counts, fallbacks)
    if spec.weight_standardization:
        from .standardization import standardize_weights

        standardize_weights(converted, include=spec.include, exclude=spec.exclude)
    if counts:
        summary = ", ".join(f"{n} {src} → {spec.target}" for src, n in sorted(counts.items()))
        logger.info("Converted %d norm layers (%s).", sum(counts.values()), summary)
    else:
        logger.info("No norm layers converted to %s.", spec.target)
    if fallbacks:  # one line; each layer at DEBUG (resolve_num_groups)
        more = f" (+{len(fallbacks) - 3} more)" if len(fallbacks) > 3 else ""
        asked = (f"dim_per_group={spec.dim_per_group}" if spec.dim_per_group
                 else f"num_groups={spec.num_groups}")
        logger.warning("GroupNorm: %d layers have channels that %s does not split; they use %s "
                       "groups, the largest divisor below (first: %s%s; each at DEBUG).",
                       len(fallbacks), asked,
                       ", ".join(map(str, sorted({g for _, g in fallbacks}))),
                       ", ".join(name for name, _ in fallbacks[:3]), more)
    return converted


def _convert(module: nn.Module, name: str, spec: NormSpec, counts, fallbacks,
             input_affine=None) -> nn.Module:
    builder, produces = NORM_TARGETS.get(spec.target)
    reader = NORM_SOURCES.lookup(module)
    if reader is not None and type(module) not in produces and spec.selects(name, module):
        layer_name = name or type(module).__name__
        if any(is_lazy(t) for t in itertools.chain(module.parameters(), module.buffers())):
            raise ValueError(f"'{layer_name}' is a lazy module; run one forward before converting")
        state = dataclasses.replace(reader(module), source=type(module).__name__,
                                    input_affine=input_affine)
        new = builder(state, spec, layer_name)
        new.train(module.training)
        counts[type(module).__name__] += 1
        if isinstance(new, nn.GroupNorm) and is_fallback(new.num_channels, new.num_groups,
                                                         spec.num_groups, spec.dim_per_group):
            fallbacks.append((layer_name, new.num_groups))
        return new
    affine = None  # what a conv that WS will take over makes of its output, for its norm
    if spec.weight_standardization:
        from .standardization import standardizable, ws_input_affine

        if standardizable(module):
            affine = ws_input_affine(module.weight, module.bias)
    for child_name, child in module.named_children():
        full_name = f"{name}.{child_name}" if name else child_name
        new_child = _convert(child, full_name, spec, counts, fallbacks,
                             affine if child_name == "norm" else None)
        if new_child is not child:
            module.add_module(child_name, new_child)
    return module


def deprecated_target_options(num_groups: int = 32, dim_per_group=None, eps=None,
                              transfer: str = "stats"):
    """Deprecated: builders now receive the conversion's :class:`gn_det.NormSpec`."""
    from . import _deprecated

    spec = NormSpec(num_groups=num_groups, dim_per_group=dim_per_group, eps=eps, transfer=transfer)
    return _deprecated.moved("gn_det.TargetOptions", "gn_det.NormSpec", spec)
