"""The errors of checkpoint I/O: one line each, ``"<path>: <problem>"``."""

from __future__ import annotations

__all__ = ["CheckpointError", "CorruptValuesError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; str(e) is one line: "<path>: <problem>"."""


class UnsafeCheckpointError(CheckpointError):
    """The file would run code / build objects outside the allow-list."""


class CorruptValuesError(CheckpointError):
    """Weights no trained layer can have (a non-finite value, a negative variance); str(e) is one
    line: "'<layer>': <problem>"."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(
    path: str, problem: str, cls: type[CheckpointError] = CheckpointError
) -> CheckpointError:
    return cls(_one_line(f"{path}: {problem}", limit=1000))


def _describe(exc: BaseException) -> str:
    """The first sentence of an exception's message, for use after "<path>: <problem>: "."""
    message = " ".join(str(exc).split())
    message = message.split(". ", 1)[0].rstrip(".")
    return _one_line(message or type(exc).__name__, limit=200)
