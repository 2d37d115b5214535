"""Bootstrap confidence intervals of COCO AP over the images of a test split.

A 50-image split resolves AP to about ±4; which differences are real is a question of the
images drawn. :func:`bootstrap_ap` answers it the standard way: COCO's per-image evaluation is
run once (``COCOeval.evaluate``: matches per image, category and IoU threshold), then the
images are resampled with replacement ``resamples`` times and AP (over IoU 0.5:0.95, all areas,
100 detections) is accumulated from the resampled images' matches each time. The interval is
the percentile interval of those APs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["APInterval", "bootstrap_ap", "bootstrap_coco_results"]


@dataclasses.dataclass
class APInterval:
    """AP (0-100) on all images, and the bootstrap percentile interval around it."""

    ap: float
    low: float
    high: float
    level: float
    resamples: int
    images: int

    def __str__(self) -> str:
        return f"{self.ap:.1f} [{self.low:.1f}, {self.high:.1f}]"


def _ap(coco_eval) -> float:
    """COCO's AP (IoU 0.5:0.95, area all, the last maxDets) from an accumulated ``COCOeval``."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    valid = precision[precision > -1]
    return float(valid.mean() * 100) if valid.size else 0.0


def _accumulate(coco_eval, image_positions: Sequence[int]) -> float:
    """AP over the images at ``image_positions`` (of the evaluated ``imgIds``; repeats count
    again), reusing the per-image matches ``evaluate()`` made."""
    evaluated = coco_eval._paramsEval
    per_image = len(evaluated.imgIds)
    areas = len(evaluated.areaRng)
    resampled = copy.copy(coco_eval)
    params = copy.copy(evaluated)
    params.imgIds = [evaluated.imgIds[i] for i in image_positions]
    count = len(params.imgIds)
    images = []  # evalImgs is laid out [category][area][image]
    for k in range(len(evaluated.catIds)):
        for a in range(areas):
            base = (k * areas + a) * per_image
            images += [coco_eval.evalImgs[base + i] for i in image_positions]
    resampled.evalImgs = images
    resampled._paramsEval = params
    resampled.params = params
    with contextlib.redirect_stdout(io.StringIO()):
        resampled.accumulate()
    assert len(resampled.evalImgs) == len(evaluated.catIds) * areas * count
    return _ap(resampled)


def bootstrap_ap(
    coco_gt,
    coco_dt,
    iou_type: str,
    *,
    resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
    image_ids: Optional[List[int]] = None,
) -> APInterval:
    """AP of detections ``coco_dt`` against ``coco_gt`` (pycocotools ``COCO`` objects) and its
    bootstrap interval over images.

    Args:
        iou_type: ``"bbox"`` or ``"segm"``.
        resamples: bootstrap resamples of the images (with replacement, the same number).
        level: coverage of the percentile interval.
        image_ids: the images to evaluate (default: every image of ``coco_gt``).
    """
    from pycocotools.cocoeval import COCOeval

    coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
    coco_eval.params.imgIds = sorted(image_ids if image_ids is not None else coco_gt.getImgIds())
    coco_eval.params.areaRng = [coco_eval.params.areaRng[0]]  # "all": the AP a study reports
    coco_eval.params.areaRngLbl = ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
    images = len(coco_eval.params.imgIds)
    ap = _accumulate(coco_eval, range(images))
    rng = np.random.default_rng(seed)
    samples = [_accumulate(coco_eval, rng.integers(0, images, images)) for _ in range(resamples)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return APInterval(ap, float(low), float(high), level, resamples, images)


def bootstrap_coco_results(
    gt_json: str, results_json: str, iou_types=("bbox", "segm"), **kwargs
) -> dict:
    """:func:`bootstrap_ap` for detectron2's ``coco_instances_results.json`` against the
    dataset's COCO json, for each of ``iou_types``; ``{iou_type: APInterval}``. No detections
    at all is AP 0 with interval [0, 0]."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_json)
    with open(results_json) as f:
        results = json.load(f)
    out = {}
    for iou_type in iou_types:
        found = [r for r in results if iou_type != "segm" or "segmentation" in r]
        if not found:
            images = len(coco_gt.getImgIds())
            out[iou_type] = APInterval(
                0.0, 0.0, 0.0, kwargs.get("level", 0.95), kwargs.get("resamples", 200), images
            )
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(found)
        out[iou_type] = bootstrap_ap(coco_gt, coco_dt, iou_type, **kwargs)
    return out
