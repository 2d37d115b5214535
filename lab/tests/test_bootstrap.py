"""Bootstrap intervals of COCO AP over images, against a case whose answer is known."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gn_det_lab.bootstrap import bootstrap_ap, paired_difference


def _coco(images: int, found: int):
    """One category; every image one 20x20 box; the first ``found`` images have a perfect
    detection (scores in random order), the rest none. AP is then COCO's interpolated precision
    1 up to recall found/images and 0 after: (the recall thresholds up to it) / 101."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": 64, "width": 64} for i in range(images)],
        "annotations": [
            {
                "id": i + 1,
                "image_id": i,
                "category_id": 1,
                "bbox": [10, 10, 20, 20],
                "area": 400.0,
                "iscrowd": 0,
            }
            for i in range(images)
        ],
        "categories": [{"id": 1, "name": "box"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        scores = np.random.default_rng(0).permutation(found) / found
        dt = gt.loadRes(
            [
                {"image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "score": float(s)}
                for i, s in zip(range(found), scores)
            ]
        )
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


def test_the_paired_interval_is_narrower_than_two_separate_ones_and_excludes_a_real_gap():
    """Model b finds what model a finds and 60 images more (of 400): resampling the same images
    for both, the difference is the found fraction of those 60 (15 points, binomial standard
    error about 1.8), far tighter than the two models' own intervals (about +-5 each)."""
    gt, dt_a = _coco(400, 200)
    _, dt_b = _coco(400, 260)
    a = bootstrap_ap(gt, dt_a, "bbox", resamples=300, seed=0)
    b = bootstrap_ap(gt, dt_b, "bbox", resamples=300, seed=0)
    result = paired_difference({1: (a.ap, a.samples)}, {1: (b.ap, b.samples)})
    assert result["difference"] == pytest.approx(b.ap - a.ap) == pytest.approx(60 / 101 * 100 / 4)
    assert 10.5 <= result["low"] < result["difference"] < result["high"] <= 19.5
    width = result["high"] - result["low"]
    assert width < 0.6 * ((a.high - a.low) + (b.high - b.low))
    assert result["per_seed"] == {1: pytest.approx(b.ap - a.ap)}


def test_the_paired_interval_holds_the_seeds_spread_and_is_zero_for_one_model():
    flat = [50.0] * 100  # no image variance: only the seeds' differences are left
    a = {seed: (50.0, flat) for seed in (1, 2, 3)}
    b = {seed: (50.0 + d, [50.0 + d] * 100) for seed, d in ((1, 1.0), (2, 5.0), (3, 9.0))}
    result = paired_difference(a, b, draws=4000)
    assert result["difference"] == pytest.approx(5.0)
    assert 1.0 <= result["low"] < 5.0 < result["high"] <= 9.0
    assert result["high"] - result["low"] > 4.0  # three seeds, resampled: a wide interval
    same = paired_difference(a, a)
    assert same["difference"] == same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(a, {1: b[1], 2: b[2]})


class _Oracle(torch.nn.Module):
    """Predicts, for each image it is given, that image's ground truth (looked up by file name
    in the datasets named), at score 1: AP 100 where the evaluation scores the images the
    model saw."""

    def __init__(self, *datasets):
        super().__init__()
        from detectron2.data import DatasetCatalog

        self.truth = {d["file_name"]: d for name in datasets for d in DatasetCatalog.get(name)}

    def forward(self, batched_inputs):
        from detectron2.data.detection_utils import annotations_to_instances
        from detectron2.structures import Instances

        outputs = []
        for item in batched_inputs:
            record = self.truth[item["file_name"]]
            size = (record["height"], record["width"])
            gt = annotations_to_instances(record["annotations"], size, mask_format="bitmask")
            found = Instances(
                size,
                pred_boxes=gt.gt_boxes,
                pred_classes=gt.gt_classes,
                scores=torch.ones(len(gt)),
                pred_masks=gt.gt_masks.tensor,
            )
            outputs.append({"instances": found})
        return outputs


def test_evaluate_intervals_runs_the_model_on_the_dataset_it_scores(tiny_env):
    """The split evaluated is the one named, whatever the config's DATASETS.TEST says (the model
    was once run on DATASETS.TEST and scored against the named split's ground truth: AP ~0)."""
    from gn_det.cli.config_files import load_config, resolve_config_name
    from gn_det_lab.backbone import evaluate_intervals

    cfg = load_config(resolve_config_name("shapes/gn.yaml"))
    cfg.merge_from_list(["DATASETS.TEST", "('shapes_tiny_train',)", "DATALOADER.NUM_WORKERS", "0"])
    result = evaluate_intervals(
        cfg, _Oracle("shapes_tiny_train", "shapes_tiny_val").eval(), "shapes_tiny_val", resamples=20
    )
    for kind in ("box", "mask"):
        assert result[kind]["ap"] == pytest.approx(100.0, abs=1.0), (kind, result)
