"""How far a converted model's features are from its source's: per-stage cosine on real images."""

from __future__ import annotations

import collections
from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from torch import nn

__all__ = ["load_images", "backbone_cosines"]


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


@torch.no_grad()
def backbone_cosines(reference: nn.Module, other: nn.Module, inputs: List[Dict]) -> Dict[str, float]:
    """Mean over images of the cosine between the two models' backbone outputs, per stage.

    Both models are run in eval mode on one image at a time (BN uses its running statistics).
    """
    totals: Dict[str, float] = collections.defaultdict(float)
    modes = reference.training, other.training
    reference.eval(), other.eval()
    try:
        for item in inputs:
            features = []
            for model in (reference, other):
                images = model.preprocess_image([item])
                features.append(model.backbone(images.tensor))
            for stage, a in features[0].items():
                b = features[1][stage]
                totals[stage] += torch.nn.functional.cosine_similarity(
                    a.flatten().double(), b.flatten().double(), dim=0
                ).item()
    finally:
        reference.train(modes[0]), other.train(modes[1])
    return {stage: total / len(inputs) for stage, total in totals.items()}
