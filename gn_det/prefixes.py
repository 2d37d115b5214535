"""Module-name prefixes: which layers of a model an operation takes (``include`` / ``exclude``)."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

__all__ = ["Prefixes", "as_prefixes", "matches", "selected"]

Prefixes = Union[None, str, Sequence[str]]


def as_prefixes(value: Prefixes, what: str) -> Tuple[str, ...]:
    """``value`` as a tuple of prefixes; ``ValueError`` naming ``what`` if it holds a non-string."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be module-name prefixes (strings), got {value!r}")
    return tuple(value)


def matches(name: str, prefixes: Tuple[str, ...]) -> bool:
    """True if ``name`` is one of ``prefixes`` or inside one (``"a.b"`` is inside ``"a"``)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def selected(name: str, include: Tuple[str, ...], exclude: Tuple[str, ...]) -> bool:
    """Whether ``name`` is inside ``include`` (all names when it is empty) and not ``exclude``."""
    return (not include or matches(name, include)) and not matches(name, exclude)
