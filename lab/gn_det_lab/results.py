"""Results files in ``lab/tools/render_results.py``'s format, and their Markdown tables, for the
study tools that write their own (``lab/tools/backbone_study.py``, ``lab/tools/fold_study.py``)."""

from __future__ import annotations

import json
from typing import Any, Sequence

__all__ = ["markdown_table", "write_results"]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: header, rule, one line per row of cells (as they print)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_results(
    path,
    *,
    title: str,
    command: str,
    machine: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    data: Any,
) -> None:
    """Write a results file atomically: what ``lab/tools/render_results.py`` renders (title,
    command, machine, columns, rows) and the data behind it. ``command`` is what reproduces the
    table, so an empty one is refused (ValueError) before anything is written."""
    from gn_det.checkpoint.io import write_text_atomically

    if not isinstance(command, str) or not command.strip():
        raise ValueError(f"{path}: a results file needs the command that made it, not {command!r}")
    result = {
        "title": title,
        "command": command,
        "machine": machine,
        "columns": list(columns),
        "rows": [list(r) for r in rows],
        "data": data,
    }
    write_text_atomically(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
