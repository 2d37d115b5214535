"""Results a person can see: predictions drawn beside ground truth (:func:`visualize_predictions`).
The program ``tools/visualize.py`` is in :mod:`gn_det.cli.visualize`. Training curves: detectron2's
TensorBoard events (``tensorboard --logdir OUTPUT_DIR``)."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple, Union

import numpy as np

from . import _deprecated

__all__ = ["compose_panels", "default_visualize_dir", "draw_ground_truth", "draw_predictions",
           "predict", "save_figure", "visualize_predictions", "write_atomic"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

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


__getattr__ = _deprecated.forward_moved_names(__name__, "gn_det.cli.visualize",
                                              ("visualize_main",))
