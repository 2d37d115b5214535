#!/usr/bin/env python
"""The results tables of the README, docs/ and lab/, rendered from the result files in lab/results.

    lab/tools/render_results.py            # rewrite the tables of README.md, docs/*.md, lab/*.md
    lab/tools/render_results.py --check    # exit 1, naming them, if a table differs from its file
    lab/tools/render_results.py --figures  # also redraw the figures drawn from results (FIGURES)

A results table in Markdown sits between two comments that name its file::

    <!-- results: small_batch_grid -->
    | norm | images/batch | ... |
    <!-- /results -->

and ``lab/results/small_batch_grid.json`` holds what it shows::

    {"title": "...", "command": "the command that measured it", "machine": "...",
     "columns": ["norm", "images/batch", ...], "rows": [["BN", "8", ...], ...]}

A number in prose is marked the same way, inline (``gn_det_lab.prose``)::

    ahead by <!-- value: backbone_paired data.difference.box.difference +.1f -->+0.4<!-- /value -->

A cell is its text (as the table prints it), a list of texts and references joined, or a
reference to a cell of another results file, ``{"from": "small_batch_grid", "where": {"norm":
"GN", "images/batch": "1"}, "column": "box / mask AP shapes_test"}`` (its emphasis dropped), so
that a number quoted in a summary (the README's results table) is the number of the study that
measured it, and goes stale with it. ``where`` matches the source's cells as they print,
emphasis included. The study and benchmark tools write their results files themselves
(``lab/tools/backbone_study.py report --json``); older studies' files hold the tables their
tools printed then.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]  # the repository: README.md, docs/, lab/
sys.path.insert(0, str(ROOT / "lab"))  # gn_det_lab is not installed

from gn_det_lab.prose import render_values, stale_values  # noqa: E402

RESULTS = ROOT / "lab" / "results"
BLOCK = re.compile(r"(<!-- results: ([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def load(name: str, cache: Dict[str, dict] = None) -> dict:
    cache = {} if cache is None else cache
    if name not in cache:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        cache[name] = json.loads(path.read_text())
    return cache[name]


def _cell(value, cache: Dict[str, dict]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, list):  # text and references, joined
        return "".join(_cell(part, cache) for part in value)
    source = load(value["from"], cache)
    columns = source["columns"]
    if columns.count(value["column"]) != 1:
        raise ValueError(
            f"{value}: {value['from']} has {columns.count(value['column'])} columns named so, not 1"
        )
    matches = [
        row
        for row in source["rows"]
        if all(_cell(row[columns.index(k)], cache) == v for k, v in value["where"].items())
    ]
    if len(matches) != 1:
        raise ValueError(f"{value}: {len(matches)} rows of {value['from']} match, not 1")
    quoted = _cell(matches[0][columns.index(value["column"])], cache)
    return quoted.replace("**", "")  # the source table's emphasis is its own


def render(name: str, cache: Dict[str, dict] = None) -> str:
    """The Markdown table of results file ``name``."""
    cache = {} if cache is None else cache
    result = load(name, cache)
    columns = result["columns"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        if len(row) != len(columns):
            raise ValueError(
                f"{name}: a row has {len(row)} cells for {len(columns)} columns: {row}"
            )
        lines.append("| " + " | ".join(_cell(v, cache) for v in row) + " |")
    return "\n".join(lines) + "\n"


def documents() -> List[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "lab").glob("*.md")),
    ]


def stale() -> List[str]:
    """``file: table`` for every results table whose text differs from its file's rendering, and
    ``file: name path: ...`` for every marked value in prose (``gn_det_lab.prose``)."""
    cache: Dict[str, dict] = {}
    found = []
    for path in documents():
        text = path.read_text()
        for match in BLOCK.finditer(text):
            if match.group(3) != render(match.group(2), cache):
                found.append(f"{path.relative_to(ROOT)}: {match.group(2)}")
        for line in stale_values(text, lambda name: load(name, cache)):
            found.append(f"{path.relative_to(ROOT)}: {line}")
    return found


def rewrite() -> List[str]:
    """Render every results table in place; returns the documents changed."""
    cache: Dict[str, dict] = {}
    changed = []
    for path in documents():
        text = path.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + render(m.group(2), cache) + m.group(4), text)
        new = render_values(new, lambda name: load(name, cache))
        if new != text:
            path.write_text(new)
            changed.append(str(path.relative_to(ROOT)))
    return changed


def _numbers(text: str) -> List[float]:
    """The numbers of a cell as it prints ("**71.9 / 71.4** (test 78.4 / 78.7)" -> 71.9, 71.4,
    ...)."""
    return [float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*\.?\d*", text)]


def _column(result: dict, name: str) -> List[str]:
    index = result["columns"].index(name)
    return [row[index] for row in result["rows"]]


#: One colour per norm variant, the same in both panels of norm_costs.png (keys: the variant's
#: name without its table decorations, as _norm_cost_variant gives it).
NORM_COST_COLOURS = {
    "frozenbn_2fc": "C7",
    "frozenbn_4conv1fc": "C0",
    "bn": "C2",
    "gn": "C1",
    "gn_native": "C4",
    "gn_recompute": "C3",
}


def _norm_cost_variant(cell: str) -> str:
    """A variant's name as NORM_COST_COLOURS keys it ("**frozenbn_4conv1fc** (reference)" ->
    "frozenbn_4conv1fc", "gn (converted)" -> "gn")."""
    return cell.replace("**", "").split(" (")[0].strip()


def _figure_norm_costs(axes_figure):
    """Time (17 interleaved rounds) and peak memory of the norm variants, / FrozenBN-same-head,
    each variant in its colour of NORM_COST_COLOURS in both panels."""
    figure, (time_ax, memory_ax) = axes_figure(1, 2, (10, 3.4))
    rounds = load("norm_variants_time_17_rounds")
    variants = [_norm_cost_variant(v) for v in _column(rounds, "variant")]
    ratios = [[_numbers(row[i])[0] for i in (2, 4, 6)] for row in rounds["rows"]]
    # converted GN / FrozenBN-same-head within each round: mean and its standard error
    spread = next(
        row
        for row in load("norm_variants_ratios_17_rounds")["rows"]
        if row[0].startswith("converted GN / FrozenBN") and row[1] == "17"
    )
    means, errors = zip(*(_numbers(cell)[:2] for cell in spread[2:5]))
    width = 0.8 / len(variants)
    for k, (variant, values) in enumerate(zip(variants, ratios)):
        x = [i + (k - (len(variants) - 1) / 2) * width for i in range(3)]
        # bars from 1.0: the claim is each variant's difference from the reference
        time_ax.bar(
            x,
            [v - 1.0 for v in values],
            width,
            bottom=1.0,
            label=variant,
            color=NORM_COST_COLOURS[variant],
        )
        if variant == "gn":
            time_ax.errorbar(
                x,
                means,
                yerr=errors,
                fmt="o",
                color="black",
                markersize=3,
                capsize=3,
                linewidth=1,
                label="gn, ratio within each round: mean ± s.e.",
            )
    time_ax.axhline(1.0, color=NORM_COST_COLOURS["frozenbn_4conv1fc"], linewidth=1.2)
    time_ax.set_xticks(
        range(3), ["training step\n1 image", "training step\n2 images", "inference\n1 image"]
    )
    time_ax.set_ylim(0.9, 1.2)
    time_ax.set_ylabel("time / frozenbn_4conv1fc (bars: medians)")
    time_ax.set_title("time, 17 interleaved rounds (CPU)", fontsize=10)
    time_ax.grid(axis="y", alpha=0.3)
    time_ax.legend(fontsize=7, loc="upper left")
    memory = load("norm_variants_memory")
    labels = [v.replace("**", "").replace(" (reference)", "") for v in _column(memory, "variant")]
    names = [_norm_cost_variant(v) for v in _column(memory, "variant")]
    peaks = [_numbers(v)[0] for v in _column(memory, "peak / reference")]
    memory_ax.barh(range(len(names)), peaks, color=[NORM_COST_COLOURS[name] for name in names])
    memory_ax.set_yticks(range(len(names)), labels, fontsize=8)
    memory_ax.invert_yaxis()
    memory_ax.axvline(1.0, color="black", linewidth=0.8)
    for i, value in enumerate(peaks):
        memory_ax.text(
            value + 0.03,
            i,
            f"{value:.2f}",
            va="center",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )
    memory_ax.set_xlim(0, max(peaks) * 1.2)
    memory_ax.set_xlabel("peak training memory / frozenbn_4conv1fc")
    memory_ax.set_title("memory, 2 images of 800x1066 (one run each)", fontsize=10)
    return figure


def _figure_bn8_plateau(axes_figure):
    """BN at 8 images per batch: AP on shapes_val against images seen, two learning rates."""
    figure, axes = axes_figure(1, 2, (9, 3.2))
    result = load("bn8_plateau")
    images = [_numbers(v)[0] for v in _column(result, "images seen")]
    series = {
        "LR 1e-3 (square-root scaling)": _column(result, result["columns"][1]),
        "LR 2e-3 (linear scaling)": _column(result, result["columns"][2]),
    }
    for ax, which, title in zip(axes, (0, 1), ("box AP", "mask AP")):
        for k, (label, cells) in enumerate(series.items()):
            values = [_numbers(c)[which] for c in cells]
            ax.plot(
                images,
                values,
                marker="o",
                markersize=3,
                color=f"C{k}",
                label=f"{label}: {values[-1]:.1f}",
            )
        ax.axvline(11600, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(0, 80)
        ax.set_xlabel("images seen (LR x0.1 at the dotted line)")
        ax.set_title(f"{title}, shapes_val", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return figure


def _figure_norm_comparison(axes_figure):
    """GN, BN and no norm at 2 images per batch: box AP on shapes_val at 600, 1,200, 1,800 steps,
    each at its best learning rate."""
    figure, (ax,) = axes_figure(1, 1, (5, 3.4))
    result = load("norms_at_2_images")
    for k, row in enumerate(r for r in result["rows"] if r[1].startswith("**")):
        early = _numbers(row[4])
        final = _numbers(row[2])[0]
        values = [*early, final]
        ax.plot(
            [600, 1200, 1800],
            values,
            marker="o",
            color=f"C{k}",
            label=f"{row[0]}, LR {row[1].strip('*')}: {final:.1f}",
        )
    ax.set_ylim(0, 80)
    ax.set_xlabel("iterations (2 images each; LR x0.1 at 1,450)")
    ax.set_title("box AP on shapes_val, each norm at its best LR", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return figure


def _figure_small_batch(axes_figure):
    """The README's figure: box and mask AP on shapes_test against images per batch, each norm
    at its cell of small_batch_grid (seed 1, as the README's table quotes it; BN's seed 2 at 1
    image as a cross), BN's precise and per-image test statistics from bn_statistics_at_test."""
    figure, axes = axes_figure(1, 2, (9, 3.6))
    grid, at_test = load("small_batch_grid"), load("bn_statistics_at_test")
    test = "box / mask AP `shapes_test`"

    def cell(result, column, **where):
        for row in result["rows"]:
            cells = dict(zip(result["columns"], (c.replace("**", "") for c in row)))
            if all(cells[k] == v for k, v in where.items()):
                return _numbers(cells[column])
        raise ValueError(f"no row {where} in {result['title']}")

    batches = [1, 2, 4, 8]
    lines = {  # label -> (colour, style, [(box, mask) per batch])
        "GN": (
            "C2",
            "-",
            [cell(grid, test, norm="GN", **{"images/batch": str(b)}) for b in batches],
        ),
        "BN": (
            "C0",
            "-",
            [cell(grid, test, norm="BN", **{"images/batch": str(b)}) for b in batches],
        ),
    }
    bn_cells = ["1 image per batch", "2 images", "4 images", "8 images"]
    for label, mode, style in (
        ("precise", "precise", ":"),
        ("each test image's", "per image", "--"),
    ):
        values = []
        firsts = [r[0] for r in at_test["rows"]]
        for name in bn_cells:  # the mode's row follows its cell's first row
            start = firsts.index(name)
            row = next(r for r in at_test["rows"][start:] if r[1].replace("**", "") == mode)
            values.append(_numbers(row[3]))
        lines[f"BN, {label} statistics at test"] = ("C0", style, values)
    seed2 = cell(grid, test, norm="BN, seed 2")
    singles = {
        "SyncBN (1 image × 2 processes)": ("C1", cell(grid, test, norm="SyncBN")),
        "no norm (FrozenBN), 1 image": ("C3", cell(grid, test, norm="no norm")),
    }
    for ax, which, kind in zip(axes, (0, 1), ("box", "mask")):
        for label, (colour, style, values) in lines.items():
            ax.plot(
                batches, [v[which] for v in values], linestyle=style, marker="o",
                markersize=5 if style == "-" else 3, color=colour, label=label,
            )  # fmt: skip
        ax.plot([1], [seed2[which]], "x", markersize=8, color="C0", label="BN, seed 2")
        for label, (colour, values) in singles.items():
            ax.plot([1], [values[which]], "o", color=colour, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("images per batch (per process)")
        ax.set_ylabel(f"{kind} AP")
        ax.set_title(f"{kind} AP, shapes_test, 14,400 images seen (seed 1)", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8)
    return figure


#: Figures drawn from results files: path (from the repository root) -> drawing function.
FIGURES = {
    "lab/images/norm_costs.png": _figure_norm_costs,
    "lab/images/bn8_plateau.png": _figure_bn8_plateau,
    "lab/images/norm_comparison.png": _figure_norm_comparison,
    "lab/images/small_batch.png": _figure_small_batch,
}


def draw_figures() -> List[str]:
    from matplotlib.figure import Figure

    def axes_figure(rows, columns, size):
        figure = Figure(figsize=size, layout="constrained")
        return figure, list(figure.subplots(rows, columns, squeeze=False).ravel())

    written = []
    for path, draw in FIGURES.items():
        draw(axes_figure).savefig(ROOT / path, dpi=100)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a table is stale"
    )
    parser.add_argument("--figures", action="store_true", help="also redraw the figures of FIGURES")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        for line in found:
            print(f"stale: {line}", file=sys.stderr)
        return 1 if found else 0
    for line in rewrite():
        print(f"rendered {line}")
    for path in draw_figures() if args.figures else []:
        print(f"drew {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
