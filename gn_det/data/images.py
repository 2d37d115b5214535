"""Images of a registered dataset as detectron2 model inputs (calibration, verification)."""

from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils
from detectron2.data import transforms as T

__all__ = ["load_images"]


def load_images(cfg: CfgNode, dataset_name: str, num_images: int) -> List[Dict]:
    """The first ``num_images`` of a registered dataset as detectron2 model inputs (test-time
    resize and channel order of ``cfg``)."""
    records = DatasetCatalog.get(dataset_name)[:num_images]
    if not records:
        raise ValueError(f"dataset {dataset_name!r} has no images")
    resize = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    inputs = []
    for record in records:
        image = detection_utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        image = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        inputs.append({"image": tensor, "height": record["height"], "width": record["width"]})
    return inputs
