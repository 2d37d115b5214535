"""Numbers that prose quotes, tied to the results file that measured them.

A number in a sentence of README.md, docs/ or lab/ sits between two comments that say where it
comes from::

    the converted backbone is <!-- value: backbone_paired data.difference.box.difference +.1f
    -->+0.4<!-- /value --> box AP ahead

``lab/tools/render_results.py`` renders it from ``lab/results/backbone_paired.json`` (the
path's keys and list positions, dot-separated) with the format spec (optional; a number without
one prints with ``:g``, a text as it is), and ``--check`` (a test) fails when the sentence no
longer says what the file holds. A path ending in ``#k`` picks the k-th number (from 0) of a
text, e.g. ``rows.2.4#0`` is 75.3 of a cell "75.3 [74.2, 76.4]". Rendered in Markdown the
comments are invisible.
"""

from __future__ import annotations

import re
from typing import Callable, List

__all__ = ["VALUE", "render_values", "stale_values", "value_at"]

VALUE = re.compile(r"<!-- value: ([\w-]+) (\S+?)(?: (\S+))? -->(.*?)<!-- /value -->", re.S)
_NUMBER = re.compile(r"[-−+]?\d[\d,]*\.?\d*")


def value_at(result: dict, path: str, spec: str = None) -> str:
    """The text of ``path`` in a results file's ``result``, formatted with ``spec``."""
    path, _, pick = path.partition("#")
    value = result
    for key in path.split("."):
        try:
            value = value[int(key)] if isinstance(value, list) else value[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(f"{path}: no {key!r} there") from None
    if pick:
        numbers = _NUMBER.findall(str(value))
        if int(pick) >= len(numbers):
            raise KeyError(f"{path}#{pick}: {value!r} has {len(numbers)} numbers")
        value = numbers[int(pick)]
        value = float(value.replace("−", "-").replace(",", "")) if spec else value
    if spec:
        return format(float(value), spec).replace("-", "−")
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def render_values(text: str, load: Callable[[str], dict]) -> str:
    """``text`` with every marked value rendered from its results file (``load(name)``)."""

    def one(match):
        name, path, spec, _ = match.groups()
        rendered = value_at(load(name), path, spec)
        head = match.group(0)[: match.start(4) - match.start(0)]
        return f"{head}{rendered}<!-- /value -->"

    return VALUE.sub(one, text)


def stale_values(text: str, load: Callable[[str], dict]) -> List[str]:
    """``name path: "what it says" != "what the file holds"`` for every stale marked value."""
    found = []
    for match in VALUE.finditer(text):
        name, path, spec, said = match.groups()
        held = value_at(load(name), path, spec)
        if said != held:
            found.append(f'{name} {path}: "{said}" != "{held}"')
    return found
