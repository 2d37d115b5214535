"""Datasets: the embedded synthetic "shapes" set and checks for COCO-format files.

Importing this package registers the shapes datasets with detectron2 (cheap: nothing is
generated until a dataset is first fetched):

- ``shapes_train`` / ``shapes_val`` / ``shapes_test``: 256x256 images, 200 / 50 / 50 images,
  for CPU training; recipes are chosen on ``val``, results reported on ``test``.
- ``shapes_hr_train`` / ``shapes_hr_val`` / ``shapes_hr_test``: 1200x1600 images, 40 / 10 /
  10 images, for high-resolution configs at 1-2 images per GPU.
- ``shapes_large_test`` (500 images at 256x256) and ``shapes_hr_large_test`` (50 at
  1200x1600): larger held-out test splits with their own seed, where a 50-image (10-image)
  split resolves AP too coarsely for a study's conclusions. Their ``_train`` / ``_val`` are
  empty.

Files go to ``$GN_DET_CACHE`` (default ``~/.cache/gn_det``), read when this package is imported.
"""

from __future__ import annotations

import dataclasses
import os

from .coco import check_dataset_files
from .images import load_images
from .shapes import (
    SHAPE_CLASSES,
    ShapesSpec,
    default_cache_dir,
    ensure_shapes_split,
    mask_to_polygons,
    register_shapes,
    render_shapes_image,
    shapes_split_files,
)

__all__ = [
    "BUILTIN_SHAPES",
    "SHAPE_CLASSES",
    "ShapesSpec",
    "check_dataset_files",
    "default_cache_dir",
    "ensure_shapes_split",
    "load_images",
    "mask_to_polygons",
    "register_all_shapes",
    "register_shapes",
    "render_shapes_image",
    "shapes_split_files",
]

BUILTIN_SHAPES: dict[str, ShapesSpec] = {
    "shapes": ShapesSpec(),
    "shapes_hr": ShapesSpec(
        image_size=(1200, 1600),
        num_train=40,
        num_val=10,
        num_test=10,
        min_instances=4,
        max_instances=14,
        min_scale=0.05,
        max_scale=0.35,
    ),
}
BUILTIN_SHAPES["shapes_large"] = dataclasses.replace(BUILTIN_SHAPES["shapes"], num_train=0,
                                                     num_val=0, num_test=500, seed=1)
BUILTIN_SHAPES["shapes_hr_large"] = dataclasses.replace(BUILTIN_SHAPES["shapes_hr"], num_train=0,
                                                        num_val=0, num_test=50, seed=1)
"""Name prefix -> generation parameters of the datasets :func:`register_all_shapes` registers."""


def register_all_shapes(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Register every dataset of :data:`BUILTIN_SHAPES` (``{prefix}_train``, ``_val``, ``_test``).

    Idempotent; generates nothing. Returns the registered names.
    """
    names = []
    for prefix, spec in BUILTIN_SHAPES.items():
        names += register_shapes(prefix, spec, cache_dir=cache_dir)
    return names


register_all_shapes()
