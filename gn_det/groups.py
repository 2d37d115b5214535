"""Group resolution: how many GroupNorm groups a layer of C channels gets.

Wu & He (2018) use G = 32 groups everywhere, or a fixed number of channels per group
(``dim_per_group``, 16 in the paper's ablation). Widths that do not divide evenly (RegNet's 80,
240, 560, ...; 40 or 48 in small custom heads) get a defined fallback instead of an error deep
inside a forward: the largest divisor of C that is not above the requested group count.
"""

from __future__ import annotations

import logging
from typing import Optional

__all__ = ["check_group_args", "resolve_num_groups"]

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


def resolve_num_groups(
    channels: int,
    num_groups: int = 32,
    dim_per_group: Optional[int] = None,
    *,
    layer_name: Optional[str] = None,
) -> int:
    """
    Number of GroupNorm groups for a layer with ``channels`` channels.

    Args:
        channels: number of channels C of the layer.
        num_groups: requested number of groups G (default 32, the paper's choice).
        dim_per_group: if given, overrides ``num_groups``: requested channels per group, so
            G = C // dim_per_group (at least 1).
        layer_name: used only in the fallback warning, so the log names the layer.

    Returns:
        G itself when it divides C; otherwise the largest divisor of C that is smaller than the
        requested G (so groups get *larger*, never smaller, than asked), with a warning logged.
        A requested G larger than C is capped at C (one channel per group: InstanceNorm).

    Raises:
        ValueError: if any argument is not a positive integer.
    """
    _check_positive_int("channels", channels)
    check_group_args(num_groups, dim_per_group)
    if dim_per_group is not None:
        requested = max(channels // dim_per_group, 1)
        asked = f"dim_per_group={dim_per_group}"
    else:
        requested = num_groups
        asked = f"num_groups={num_groups}"
    requested = min(requested, channels)
    groups = next(g for g in range(requested, 0, -1) if channels % g == 0)
    exact = channels % dim_per_group == 0 if dim_per_group is not None else groups == num_groups
    if not exact:
        logger.warning(
            "GroupNorm%s: %d channels cannot be split as %s; using %d groups of %d channels.",
            f" at '{layer_name}'" if layer_name else "",
            channels,
            asked,
            groups,
            channels // groups,
        )
    return groups
