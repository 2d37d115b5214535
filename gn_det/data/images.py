"""Images as detectron2 model inputs (calibration, distillation, verification): the first N of
a registered dataset, or of any folder of JPEG / PNG files (no annotations needed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from PIL import Image, ImageOps

__all__ = ["IMAGE_SUFFIXES", "image_files", "load_images"]

#: What a folder of images may hold (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

logger = logging.getLogger(__name__)


def image_files(folder: Union[str, os.PathLike], num_images: Optional[int] = None) -> List[Path]:
    """The first ``num_images`` (default all) JPEG / PNG files below ``folder`` (recursively),
    in a stable order: sorted by their path relative to ``folder``.

    Raises:
        ValueError: ``folder`` is not a folder, or holds no such image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = sorted((p for p in folder.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"{folder}: no JPEG or PNG images in it or its subfolders")
    return files[:num_images]


def _read_image(file_name: str, image_format: str) -> np.ndarray:
    """detectron2's ``read_image``, except that a 16-bit image (PIL modes ``I;16``, ``I``) is
    scaled to 8 bits (65535 -> 255) where PIL's conversion would clip it at 255."""
    with Image.open(file_name) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            scaled = np.asarray(image, dtype=np.float64).clip(0, 65535) / 257
            image = Image.fromarray(scaled.round().astype(np.uint8))
        return detection_utils.convert_PIL_to_numpy(image, image_format)


def _model_input(file_name: str, cfg: CfgNode, resize: T.Augmentation) -> Dict:
    try:
        image = _read_image(file_name, cfg.INPUT.FORMAT)
    except Exception as e:  # PIL's UnidentifiedImageError, truncated files, permissions
        raise ValueError(f"{file_name}: cannot be read as an image "
                         f"({type(e).__name__}: {e})") from e
    height, width = image.shape[:2]
    image = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    return {"image": tensor, "height": height, "width": width, "file_name": str(file_name)}


def load_images(cfg: CfgNode, source: Union[str, os.PathLike], num_images: int) -> List[Dict]:
    """The first ``num_images`` images of ``source`` as detectron2 model inputs, with ``cfg``'s
    test-time resize (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) and channel order
    (``INPUT.FORMAT``).

    Args:
        source: a folder of JPEG / PNG files (a path; searched recursively, in sorted order:
            :func:`image_files`), or the name of a registered detectron2 dataset.

    Files that cannot be read as images (truncated, not images) are skipped, named in one
    warning, and the next ones taken; fewer than ``num_images`` are returned if no more are
    readable. Grayscale, RGBA, palette and 16-bit images are converted to ``INPUT.FORMAT``.

    Raises:
        ValueError: no readable image, a number below 1.
        KeyError: ``source`` is neither a folder nor a registered dataset.
    """
    if num_images < 1:
        raise ValueError(f"the number of images must be at least 1, got {num_images}")
    if isinstance(source, os.PathLike) or os.path.isdir(str(source)):
        files = [str(p) for p in image_files(source)]
    else:
        files = [record["file_name"] for record in DatasetCatalog.get(source)]
        if not files:
            raise ValueError(f"dataset {source!r} has no images")
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST],
                                  cfg.INPUT.MAX_SIZE_TEST)
    images, unreadable = [], []
    for file_name in files:
        if len(images) == num_images:
            break
        try:
            images.append(_model_input(file_name, cfg, resize))
        except ValueError as e:
            unreadable.append(str(e))
    if not images:
        raise ValueError(f"{source}: no readable image: {'; '.join(unreadable)}")
    if unreadable:
        logger.warning("Skipped %d unreadable file(s) in %s: %s", len(unreadable), source,
                       "; ".join(unreadable))
    return images
