"""Results a person can see: predictions drawn beside ground truth (:func:`visualize_predictions`)
and several runs' training curves overlaid (:func:`read_metrics`, :func:`plot_metrics`). The
programs ``tools/visualize.py`` and ``tools/plot_metrics.py`` are in :mod:`gn_det.cli.visualize`."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _deprecated

__all__ = ["AP_KEYS", "LOSS_KEYS", "RunMetrics", "compose_panels", "default_visualize_dir",
           "draw_ground_truth", "draw_predictions", "plot_metrics", "predict", "read_metrics",
           "save_figure", "visualize_predictions", "write_atomic"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: detectron2's R-CNN loss terms, in the order they are plotted (other ``loss_*`` keys follow).
LOSS_KEYS: Dict[str, str] = {"loss_cls": "box classification", "loss_box_reg": "box regression",
                             "loss_mask": "mask", "loss_rpn_cls": "RPN objectness",
                             "loss_rpn_loc": "RPN box regression"}
#: Evaluation keys of detectron2's ``COCOEvaluator`` that get a panel each.
AP_KEYS: Dict[str, str] = {"bbox/AP": "box AP", "segm/AP": "mask AP"}


def _refuse_existing(path: PathLike, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{os.fspath(path)} exists; pass --force to overwrite")


def write_atomic(path: PathLike, write: Callable[[Any], None], *, overwrite: bool) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place;
    ``FileExistsError`` if ``path`` exists and ``overwrite`` is false."""
    from .checkpoint.io import replace_atomically

    _refuse_existing(path, overwrite)
    replace_atomically(os.fspath(path), write)


def save_figure(figure, path: PathLike, *, dpi: int = 100, overwrite: bool = False) -> None:
    """Save a matplotlib figure as PNG with :func:`write_atomic`."""
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=dpi), overwrite=overwrite)


def default_visualize_dir(weights: PathLike) -> Path:
    """``visualize/`` in the folder of ``weights`` (a run's ``OUTPUT_DIR``)."""
    return Path(weights).resolve().parent / "visualize"


def predict(model, image: np.ndarray, cfg) -> "Any":
    """Run ``model`` (in eval mode) on one HxWx3 uint8 image in ``cfg.INPUT.FORMAT`` channel
    order as detectron2's ``DefaultPredictor`` does (resized to ``cfg``'s test size); returns the
    predicted ``Instances`` at the image's original size, on the CPU."""
    import torch
    from detectron2.data import transforms as T

    height, width = image.shape[:2]
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        image = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    with torch.no_grad():
        output = model([{"image": tensor, "height": height, "width": width}])[0]
    return output["instances"].to("cpu")


def _visualizer(image_rgb: np.ndarray, metadata, scale: float):
    from detectron2.utils.visualizer import ColorMode, Visualizer

    # With thing_colors, each class has its colour (jittered per instance) in both panels.
    mode = ColorMode.SEGMENTATION if metadata.get("thing_colors") else ColorMode.IMAGE
    return Visualizer(image_rgb, metadata, scale=scale, instance_mode=mode)


def draw_ground_truth(image_rgb: np.ndarray, dataset_dict: dict, metadata,
                      scale: float = 1.0) -> np.ndarray:
    """The dataset's annotations of one image drawn on it (detectron2's ``draw_dataset_dict``):
    an HxWx3 uint8 RGB image, ``scale`` times the input's size."""
    return _visualizer(image_rgb, metadata, scale).draw_dataset_dict(dataset_dict).get_image()


def draw_predictions(image_rgb: np.ndarray, instances, metadata, scale: float = 1.0) -> np.ndarray:
    """Predicted ``Instances`` drawn on the image (masks, boxes, class names, scores), coloured
    as :func:`draw_ground_truth` colours the same dataset: an HxWx3 uint8 RGB image, ``scale``
    times the input's size."""
    return _visualizer(image_rgb, metadata, scale).draw_instance_predictions(instances).get_image()


def compose_panels(panels: Sequence[Tuple[str, np.ndarray]], font_size: int = 14):
    """A ``PIL.Image`` of ``panels``' images, ``(title, HxWx3 uint8 RGB image)`` pairs, side by
    side and aligned at the top, each under a one-line title (a bar ``font_size + 10`` pixels
    high; ``font_size`` in pixels)."""
    from PIL import Image, ImageDraw, ImageFont

    title_height = font_size + 10
    width = sum(image.shape[1] for _, image in panels)
    canvas = Image.new("RGB", (width, max(i.shape[0] for _, i in panels) + title_height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=font_size)
    x = 0
    for title, image in panels:
        canvas.paste(Image.fromarray(np.asarray(image, dtype=np.uint8)), (x, title_height))
        draw.text((x + 6, title_height // 2), title, fill="black", font=font, anchor="lm")
        x += image.shape[1]
    return canvas


def visualize_predictions(model, cfg, dataset_name: str, output_dir: PathLike, *,
                          num_images: int = 4, score_threshold: float = 0.5, scale: float = 1.0,
                          overwrite: bool = False) -> List[Path]:
    """Draw ``model``'s predictions (weights loaded; put in eval mode) on the first ``num_images``
    images of a registered dataset, each into ``<output_dir>/<dataset_name>_<image stem>.png``
    (folder created if missing): ground truth (left) beside the prediction (right), or the
    prediction alone for images without annotations. Predictions scoring below
    ``score_threshold`` are not drawn; ``scale`` 2.0 doubles the drawing's size. Returns the
    paths written. Every output name is checked before the model runs: ``FileExistsError`` if
    one exists and ``overwrite`` is false; ``KeyError`` if ``dataset_name`` is not registered."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import convert_image_to_rgb, read_image

    importlib.import_module("detectron2.utils.visualizer")  # needs OpenCV: fail before any work
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset {dataset_name!r} is not registered "
                       f"(registered: {', '.join(sorted(DatasetCatalog.list()))})")
    dataset_dicts = DatasetCatalog.get(dataset_name)[:num_images]
    metadata = MetadataCatalog.get(dataset_name)
    output_dir = Path(output_dir)
    outputs = [output_dir / f"{dataset_name}_{Path(d['file_name']).stem}.png"
               for d in dataset_dicts]
    for path in outputs:
        _refuse_existing(path, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)

    model.eval()
    for dataset_dict, path in zip(dataset_dicts, outputs):
        image = read_image(dataset_dict["file_name"], format=cfg.INPUT.FORMAT)
        instances = predict(model, image, cfg)
        instances = instances[instances.scores >= score_threshold]
        image_rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        panels = []
        if "annotations" in dataset_dict:
            panels.append((f"ground truth: {len(dataset_dict['annotations'])} instances",
                           draw_ground_truth(image_rgb, dataset_dict, metadata, scale)))
        panels.append((f"prediction: {len(instances)} with score >= {score_threshold:g}",
                       draw_predictions(image_rgb, instances, metadata, scale)))
        canvas = compose_panels(panels)
        write_atomic(path, lambda f: canvas.save(f, format="PNG"), overwrite=overwrite)
        logger.info("Wrote %s (%d predictions drawn).", path, len(instances))
    return outputs


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
    _refuse_existing(output, overwrite)
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


__getattr__ = _deprecated.forward_moved_names(__name__, "gn_det.cli.visualize",
                                              ("visualize_main", "plot_metrics_main"))
