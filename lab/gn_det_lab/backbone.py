"""The backbone route (``lab/tools/backbone_study.py``): a BN-pretrained backbone converted to GN
and fine-tuned at 1 image per batch, against a GN-pretrained one and the other starts.

A *start* is how the shapes Mask R-CNN's backbone begins the fine-tuning (:data:`STARTS`); every
start trains with the same schedule; checkpoints taken at each evaluation are evaluated
afterwards on a larger held-out split with bootstrap intervals (:func:`checkpoint_intervals`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["STARTS", "checkpoint_intervals", "evaluate_intervals", "start_config"]

#: start -> (config, what MODEL.WEIGHTS is, description). Weights: "bn" the BN-pretrained
#: backbone, "gn" the GN-pretrained one, "distilled" the BN one converted with ``gn-det convert
#: --transfer distill`` on unlabeled proxy images, None nothing (from scratch).
STARTS = {
    "frozenbn": ("shapes/frozenbn.yaml", "bn", "BN-pretrained, FrozenBN (detectron2's classic)"),
    "frozenbn_gn": (
        "shapes/Base-shapes.yaml",
        "bn",
        "BN-pretrained, FrozenBN backbone, GN FPN and heads (stock detectron2)",
    ),
    "copy": ("shapes/gn.yaml", "bn", "BN-pretrained, converted to GN: copy"),
    "stats": ("shapes/gn.yaml", "bn", "BN-pretrained, converted to GN: stats"),
    "stats_ws": ("shapes/gn_ws.yaml", "bn", "BN-pretrained, converted to GN + WS: stats"),
    "distill": ("shapes/gn.yaml", "distilled", "BN-pretrained, converted to GN: stats + distill"),
    "gn_pretrained": ("shapes/gn.yaml", "gn", "GN-pretrained"),
    "scratch": ("shapes/gn.yaml", None, "GN from scratch"),
}


def start_config(start: str, weights: Dict[str, str]) -> tuple:
    """(config name, overrides) of a start, given the files of ``weights`` ("bn", "gn",
    "distilled")."""
    config, source, _ = STARTS[start]
    opts = ["MODEL.WEIGHTS", weights[source] if source else ""]
    if start in ("copy", "stats", "stats_ws"):
        opts += ["MODEL.NORM_CONVERSION.TRANSFER", start.split("_")[0]]
    if start == "frozenbn_gn":  # detectron2's own GN in the FPN and heads, nothing converted
        opts += ["MODEL.RESNETS.NORM", "FrozenBN"]
        for key in ("FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            opts += [f"MODEL.{key}.NORM", "GN"]
    return config, opts


def evaluate_intervals(cfg, model, dataset: str, resamples: int = 200) -> dict:
    """Box and mask AP of ``model`` on ``dataset`` with bootstrap intervals over its images:
    ``{"box": {"ap", "low", "high", "samples"}, "mask": {...}}`` (``samples``: each resample's
    AP, to pair with another model's; detectron2's COCO evaluation, then
    :func:`gn_det_lab.bootstrap.bootstrap_coco_results` on its detections)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    from gn_det.engine import Trainer
    from .bootstrap import bootstrap_coco_results

    DatasetCatalog.get(dataset)  # a generated split's files (COCOEvaluator reads its json first)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset,)  # Trainer.test runs the model on these, one evaluator each
    with tempfile.TemporaryDirectory() as out:
        cfg.OUTPUT_DIR = out
        Trainer.test(cfg, model, evaluators=[COCOEvaluator(dataset, output_dir=out)])
        results = Path(out) / "coco_instances_results.json"
        if not results.is_file():  # detectron2 writes none when the model detects nothing
            results.write_text("[]")
        intervals = bootstrap_coco_results(
            MetadataCatalog.get(dataset).json_file, str(results), resamples=resamples
        )
    return {
        kind: {
            "ap": i.ap,
            "low": i.low,
            "high": i.high,
            "samples": [round(x, 3) for x in i.samples],
        }
        for kind, i in (("box", intervals["bbox"]), ("mask", intervals["segm"]))
    }


def _evaluate(run_dir: Path, checkpoint: str, dataset: str, resamples: int) -> dict:
    from .bn_statistics import load_run

    cfg, model = load_run(run_dir, checkpoint)
    return evaluate_intervals(cfg, model, dataset, resamples)


def checkpoint_intervals(
    run_dir, dataset: str, *, resamples: int = 200, last: Optional[int] = None
) -> List[dict]:
    """Box and mask AP with bootstrap intervals on ``dataset`` of every checkpoint a run kept
    (``model_<iteration-1>.pth``, and ``model_final.pth`` at ``SOLVER.MAX_ITER``), or of its
    ``last`` ones, in order of iterations trained: ``[{"checkpoint", "iteration", "box": {"ap",
    "low", "high", "samples"}, "mask":
    {...}}]``. Cached in ``run_dir/intervals_<dataset>.json``: a checkpoint already there is
    not evaluated again.
    """
    from gn_det.cli.config_files import load_config

    run_dir = Path(run_dir)
    cache = run_dir / f"intervals_{dataset}.json"
    done = {r["checkpoint"]: r for r in json.loads(cache.read_text())} if cache.is_file() else {}
    final = load_config(run_dir / "config.yaml").SOLVER.MAX_ITER
    checkpoints = {int(p.name[6:13]) + 1: p.name for p in run_dir.glob("model_[0-9]*.pth")}
    checkpoints[final] = "model_final.pth"  # the same weights as the periodic one at the end
    rows = []
    for iteration, name in sorted(checkpoints.items())[-last if last else None :]:
        if name not in done:
            done[name] = {
                "checkpoint": name,
                "iteration": iteration,
                **_evaluate(run_dir, name, dataset, resamples),
            }
            cache.write_text(json.dumps(list(done.values())))
        rows.append(done[name])
    return rows
