"""Training curves of detectron2 runs (their ``metrics.json``), several runs overlaid in one PNG:
what the studies show to prove a plateau. :func:`read_metrics` reads a run tolerantly (a run
killed mid-write, keys a run does not have, NaN); :func:`plot_metrics` draws; :func:`main` is
``lab/tools/plot_metrics.py``. A single run's curves are also in detectron2's TensorBoard events.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from gn_det.visualize import save_figure

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: detectron2's R-CNN loss terms, in the order they are plotted (other ``loss_*`` keys follow).
LOSS_KEYS: Dict[str, str] = {"loss_cls": "box classification", "loss_box_reg": "box regression",
                             "loss_mask": "mask", "loss_rpn_cls": "RPN objectness",
                             "loss_rpn_loc": "RPN box regression"}
#: Evaluation keys of detectron2's ``COCOEvaluator`` that get a panel each.
AP_KEYS: Dict[str, str] = {"bbox/AP": "box AP", "segm/AP": "mask AP"}



@dataclass
class RunMetrics:
    """The plottable values of one run's ``metrics.json``: ``label`` names the run in legends;
    ``series`` maps a metric to ``(iterations, values)``, sorted by iteration, finite values only
    (a resumed run that logged an iteration twice keeps the later value); ``skipped_lines``
    counts the lines that were not a JSON object (e.g. a truncated last line)."""

    label: str
    series: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)
    skipped_lines: int = 0


def read_metrics(run: PathLike, label: Optional[str] = None) -> RunMetrics:
    """Read detectron2's ``metrics.json`` (one JSON object per line) tolerantly: lines that are
    not a JSON object (a run killed mid-write leaves a partial last line) are skipped with a
    warning; records without ``iteration``, and values that are not finite numbers (NaN from a
    diverged run), are left out. ``run`` is a run's ``OUTPUT_DIR`` or its ``metrics.json``
    (``FileNotFoundError`` if there is none); ``label`` names it in legends (default: the run
    folder's name)."""
    path = Path(run) if Path(run).is_file() else Path(run) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run} a detectron2 OUTPUT_DIR?)")
    result = RunMetrics(label if label is not None else path.resolve().parent.name)
    points: Dict[str, Dict[int, float]] = {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                result.skipped_lines += 1
                logger.warning("%s line %d: not a JSON object (truncated by a crash?), skipped.",
                               path, number)
                continue
            iteration = record.get("iteration")
            if not isinstance(iteration, (int, float)) or isinstance(iteration, bool):
                continue
            for key, value in record.items():
                if (key != "iteration" and isinstance(value, (int, float))
                        and not isinstance(value, bool) and math.isfinite(value)):
                    points.setdefault(key, {})[int(iteration)] = float(value)
    result.series = {key: (sorted(p), [p[i] for i in sorted(p)]) for key, p in points.items()}
    return result


#: What ``plot_metrics(panels=...)`` draws: AP and losses, AP alone, losses alone.
PANEL_SETS = ("all", "ap", "losses")


def _panels(runs: Sequence[RunMetrics], which: str = "all") -> List[Tuple[str, str]]:
    """``(metric key, title)`` of every panel that at least one run has data for: the AP
    panels first (what a reader looks for), then the total loss, each loss term and the
    learning rate; ``which`` (:data:`PANEL_SETS`) keeps the AP or the loss panels alone."""
    if which not in PANEL_SETS:
        raise ValueError(f"panels must be one of {', '.join(PANEL_SETS)}, got {which!r}")
    present = set().union(*(run.series for run in runs))
    ap_panels = [(k, f"{k} ({title}), evaluation") for suffix, title in AP_KEYS.items()
                 for k in sorted(present) if _ap_suffix(k) == suffix]
    losses = [k for k in LOSS_KEYS if k in present]
    losses += sorted(k for k in present if k.startswith("loss_") and k not in LOSS_KEYS)
    loss_panels = [("total_loss", "total_loss")] if "total_loss" in present else []
    loss_panels += [(k, f"{k} ({LOSS_KEYS[k]})" if k in LOSS_KEYS else k) for k in losses]
    if "lr" in present:
        loss_panels.append(("lr", "learning rate"))
    return {"all": ap_panels + loss_panels, "ap": ap_panels, "losses": loss_panels}[which]


def _ap_suffix(key: str) -> Optional[str]:
    """The ``AP_KEYS`` entry ``key`` reports: itself, or, with several test datasets, what
    follows detectron2's "<dataset>/" prefix; None for other metrics."""
    return next((suffix for suffix in AP_KEYS if key == suffix or key.endswith("/" + suffix)), None)


def plot_metrics(runs: Sequence[RunMetrics], output: PathLike, *, dpi: int = 100,
                 overwrite: bool = False, panels: str = "all") -> Tuple[int, int]:
    """Draw the runs (from :func:`read_metrics`) overlaid, one panel per metric, into one PNG
    written atomically; returns the image's ``(width, height)`` in pixels. The panels are those
    of the metrics at least one run has: ``bbox/AP`` and ``segm/AP`` first, each with every run's
    last value in its legend, then ``total_loss``, each ``loss_*`` term and the learning rate,
    the first of them with the runs' legend. Each run has one colour throughout. ``panels``
    (:data:`PANEL_SETS`): ``"ap"`` or ``"losses"`` draws only those. Each panel is 4 x 3 inches
    (``dpi`` pixels per inch), 3 to a row. Raises ``ValueError`` if no run has anything to plot,
    ``FileExistsError`` if ``output`` exists and ``overwrite`` is false."""
    # A bare Figure renders with Agg and leaves pyplot's global backend and state alone.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    which, panels = panels, _panels(runs, panels)
    if not panels:
        raise ValueError(f"no run has {'training or evaluation' if which == 'all' else which} "
                         "values to plot")
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(f"{os.fspath(output)} exists; pass --force to overwrite")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.0 * columns, 3.0 * rows), dpi=dpi, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    last_iteration = max(max(iterations) for run in runs for iterations, _ in run.series.values())
    for ax, (key, title) in zip(axes, panels):
        is_ap = _ap_suffix(key) is not None
        for index, run in enumerate(runs):
            if key not in run.series:
                continue
            iterations, values = run.series[key]
            # AP panels: the last value in the legend, where labels cannot overlap.
            label = f"{run.label}: {values[-1]:.1f}" if is_ap else run.label
            ax.plot(iterations, values, color=f"C{index}", label=label, linewidth=1.2,
                    marker="o" if is_ap else None, markersize=4)
        if is_ap:
            # From 0: the size of AP shows, not only its changes.
            ax.set_ylim(0, max(1.0, ax.get_ylim()[1] * 1.05))
            ax.legend(fontsize=7, loc="lower right", title="last value", title_fontsize=7)
        # One iteration scale for every panel, so that panels line up for the eye.
        ax.set_xlim(0, last_iteration * 1.04)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=f"C{i}", label=run.label) for i, run in enumerate(runs)]
    first_loss = next((i for i, (key, _) in enumerate(panels) if _ap_suffix(key) is None), None)
    if first_loss is not None:
        axes[first_loss].legend(handles=handles, fontsize=8)
    # Not bbox_inches="tight": the image keeps the size the figure states.
    save_figure(figure, output, dpi=dpi, overwrite=overwrite)
    return int(round(figure.get_figwidth() * dpi)), int(round(figure.get_figheight() * dpi))


def main(argv: Optional[List[str]] = None) -> int:
    """``lab/tools/plot_metrics.py``; returns the exit code (2 with a one-line message on bad
    input)."""
    parser = argparse.ArgumentParser(prog="lab/tools/plot_metrics.py", description="Plot the "
                                     "losses, learning rate and AP of one or more detectron2 runs "
                                     "(their metrics.json) overlaid in one PNG.", epilog="Example: "
                                     "lab/tools/plot_metrics.py output/shapes_bn output/shapes_gn "
                                     "--labels BN GN --output norm_comparison.png")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run's OUTPUT_DIR (holding metrics.json), or a metrics.json")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="legend names, one per run (default: the folder names)")
    parser.add_argument("--output", required=True, metavar="PNG", help="the image to write")
    parser.add_argument("--dpi", type=int, default=100,
                        help="pixels per inch (default 100; a panel is 4x3 in)")
    parser.add_argument("--panels", choices=PANEL_SETS, default="all",
                        help="all (AP first, then losses and the learning rate), ap, or losses")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    if args.dpi < 1:
        parser.error("--dpi must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    labels = args.labels or [None] * len(args.runs)
    try:
        runs = [read_metrics(run, label) for run, label in zip(args.runs, labels)]
        for run, path in zip(runs, args.runs):
            if not run.series:
                logger.warning("%s: no values to plot (did the run log anything?).", path)
        width, height = plot_metrics(runs, args.output, dpi=args.dpi, overwrite=args.force,
                                     panels=args.panels)
    except (OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"lab/tools/plot_metrics.py: error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.output} ({width}x{height}, {len(runs)} runs)")
    return 0
