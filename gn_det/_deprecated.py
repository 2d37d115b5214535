"""Old public names kept for one release: each use warns and names the new one."""

from __future__ import annotations

import warnings


def moved(old: str, new: str, value):
    """``value``, with a ``DeprecationWarning`` saying that ``old`` is now ``new``."""
    warnings.warn(f"{old} is deprecated and will be removed in gn_det 0.3; use {new}",
                  DeprecationWarning, stacklevel=3)
    return value
