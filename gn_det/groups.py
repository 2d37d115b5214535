"""How many GroupNorm groups a layer of C channels gets: G = 32 (Wu & He 2018), or C over a
fixed ``dim_per_group``; widths G does not divide (RegNet's 80, 240, ...) fall back to the
largest divisor of C below G instead of failing inside a forward."""

from __future__ import annotations

import logging
from typing import Optional

__all__ = ["check_group_args", "is_fallback", "resolve_num_groups"]

logger = logging.getLogger(__name__)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_group_args(num_groups: int = 32, dim_per_group: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless the group request is usable (positive integers)."""
    if dim_per_group is not None:
        _check_positive_int("dim_per_group", dim_per_group)
    else:
        _check_positive_int("num_groups", num_groups)


def resolve_num_groups(channels: int, num_groups: int = 32, dim_per_group: Optional[int] = None,
                       *, layer_name: Optional[str] = None) -> int:
    """Number of GroupNorm groups for a layer of ``channels`` (C) channels.

    The requested G is ``num_groups``, or C // ``dim_per_group`` (at least 1) when that is given,
    capped at C (one channel per group: InstanceNorm). Returns G itself when it divides C,
    otherwise the largest divisor of C below G (groups get *larger*, never smaller, than asked),
    logged at DEBUG naming ``layer_name`` (:func:`gn_det.convert_norm` sums such layers up in one
    warning). ``ValueError`` if an argument is not a positive integer.
    """
    _check_positive_int("channels", channels)
    check_group_args(num_groups, dim_per_group)
    by_size = dim_per_group is not None
    requested = min(max(channels // dim_per_group, 1) if by_size else num_groups, channels)
    groups = next(g for g in range(requested, 0, -1) if channels % g == 0)
    if is_fallback(channels, groups, num_groups, dim_per_group):
        asked = f"dim_per_group={dim_per_group}" if by_size else f"num_groups={num_groups}"
        logger.debug("GroupNorm%s: %d channels cannot be split as %s; using %d groups of %d "
                     "channels.", f" at '{layer_name}'" if layer_name else "", channels, asked,
                     groups, channels // groups)
    return groups


def is_fallback(channels: int, groups: int, num_groups: int = 32,
                dim_per_group: Optional[int] = None) -> bool:
    """Whether ``groups`` for ``channels`` channels differs from the request (a fallback)."""
    return channels % dim_per_group != 0 if dim_per_group is not None else groups != num_groups
