"""Old public names kept for one release: each use warns and names the new one."""

from __future__ import annotations

import importlib
import warnings


def moved(old: str, new: str, value):
    """``value``, with a ``DeprecationWarning`` saying that ``old`` is now ``new``."""
    warnings.warn(f"{old} is deprecated and will be removed in gn_det 0.3; use {new}",
                  DeprecationWarning, stacklevel=3)
    return value


def forward_moved_names(module: str, new_module: str, names):
    """A module ``__getattr__`` that serves ``names``, moved from ``module`` to ``new_module``,
    with a warning (:func:`moved`)."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(new_module), name)
        return moved(f"{module}.{name}", f"{new_module}.{name}", value)

    return __getattr__
