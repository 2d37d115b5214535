"""Bootstrap intervals of COCO AP over images, against a case whose answer is known."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gn_det.studies.bootstrap import bootstrap_ap


def _coco(images: int, found: int):
    """One category; every image one 20x20 box; the first ``found`` images have a perfect
    detection (scores in random order), the rest none. AP is then COCO's interpolated precision
    1 up to recall found/images and 0 after: (the recall thresholds up to it) / 101."""
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "height": 64, "width": 64} for i in range(images)],
                  "annotations": [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20],
                                   "area": 400.0, "iscrowd": 0} for i in range(images)],
                  "categories": [{"id": 1, "name": "box"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        scores = np.random.default_rng(0).permutation(found) / found
        dt = gt.loadRes([{"image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "score": float(s)}
                         for i, s in zip(range(found), scores)])
    return gt, dt


def test_the_interval_is_the_binomial_one_of_a_known_recall():
    gt, dt = _coco(400, 200)
    result = bootstrap_ap(gt, dt, "bbox", resamples=400, seed=0)
    assert result.ap == pytest.approx(51 / 101 * 100)  # recall 0.5: thresholds 0.00 .. 0.50
    # Resampled, the recall is Binomial(400, 0.5) / 400: standard error 0.025, so the 95 %
    # interval of AP is about 100 * (0.5 ± 1.96 * 0.025) (+0.5 for the interpolation).
    assert 44.5 <= result.low <= 47.0 and 54.0 <= result.high <= 56.5
    assert (result.images, result.resamples, result.level) == (400, 400, 0.95)


def test_the_full_sample_ap_is_cocos_own_and_a_perfect_model_has_no_spread():
    gt, dt = _coco(120, 90)
    reference = COCOeval(gt, dt, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        reference.evaluate(), reference.accumulate(), reference.summarize()
    result = bootstrap_ap(gt, dt, "bbox", resamples=50)
    assert result.ap == pytest.approx(reference.stats[0] * 100)
    gt, dt = _coco(50, 50)
    perfect = bootstrap_ap(gt, dt, "bbox", resamples=50)
    assert perfect.ap == perfect.low == perfect.high == pytest.approx(100.0)
