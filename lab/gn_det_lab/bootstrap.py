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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["APInterval", "bootstrap_ap", "bootstrap_coco_results", "paired_difference"]


@dataclasses.dataclass
class APInterval:
    """AP (0-100) on all images, and the bootstrap percentile interval around it."""

    ap: float
    low: float
    high: float
    level: float
    resamples: int
    images: int
    #: AP of each resample, in the order the resamples were drawn: models evaluated on the same
    #: images with the same ``seed`` drew the same resamples, so their samples pair up.
    samples: List[float] = dataclasses.field(default_factory=list, repr=False)

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
    return APInterval(ap, float(low), float(high), level, resamples, images, samples)


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
            resamples = kwargs.get("resamples", 200)
            out[iou_type] = APInterval(
                0.0, 0.0, 0.0, kwargs.get("level", 0.95), resamples, images, [0.0] * resamples
            )
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(found)
        out[iou_type] = bootstrap_ap(coco_gt, coco_dt, iou_type, **kwargs)
    return out


def paired_difference(
    a: Dict[int, Tuple[float, Sequence[float]]],
    b: Dict[int, Tuple[float, Sequence[float]]],
    *,
    draws: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """The difference b - a of two models' AP, averaged over training seeds, with a percentile
    interval that resamples both the test images and the seeds.

    ``a`` and ``b`` map a training seed to (AP on all images, the AP of each image resample):
    the ``samples`` of :func:`bootstrap_ap` run with the same ``seed`` on the same images, so
    resample ``r`` is the same images for every model and seed (the pairing over images). The
    seeds are paired too: seed ``s`` of ``a`` and of ``b`` drew the same data order and the same
    initialisation of the layers they share. Each draw picks one image resample and as many
    seeds as there are, with replacement, and averages ``b - a`` over them: the interval holds
    the images' variance and the seeds' (a two-stage bootstrap; with 3 seeds the seeds' part
    is coarse, and the interval is no narrower than the data allow).

    Returns ``{"difference", "low", "high", "level", "draws", "per_seed": {seed: b - a}}``.
    """
    seeds = sorted(a)
    if sorted(b) != seeds or not seeds:
        raise ValueError(f"the two models need the same seeds: {sorted(a)} and {sorted(b)}")
    samples = np.array([np.asarray(b[s][1]) - np.asarray(a[s][1]) for s in seeds])
    if samples.ndim != 2 or samples.shape[1] == 0:
        raise ValueError("every seed needs the same, non-zero number of image resamples")
    rng = np.random.default_rng(seed)
    pick_resample = rng.integers(0, samples.shape[1], draws)
    pick_seeds = rng.integers(0, len(seeds), (draws, len(seeds)))
    values = samples[pick_seeds, pick_resample[:, None]].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    per_seed = {s: b[s][0] - a[s][0] for s in seeds}
    return {
        "difference": float(np.mean(list(per_seed.values()))),
        "low": float(low),
        "high": float(high),
        "level": level,
        "draws": draws,
        "per_seed": per_seed,
    }
