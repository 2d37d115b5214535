"""Which statistics a trained BN detector is evaluated with, and what each costs it in AP.

A BN layer trains on the statistics of its batch and is evaluated with running averages of
them. At 1 image per batch the two differ in two ways (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021: its sections on the moving average and on train-test inconsistency): the
exponential moving average (momentum 0.1) remembers about the last ten images, so it is a noisy
estimate of the population's statistics; and the population's statistics are not what training
normalised with, which was each image's own. Used by ``lab/tools/bn_statistics_study.py``, which
evaluates a finished run three ways:

- ``running``: as trained, with the running averages (what the run's own evaluation did);
- ``precise``: with population statistics recomputed over a number of training images at the
  run's batch size, weights fixed (detectron2's ``PreciseBN`` hook, fvcore's
  ``update_bn_stats``): the noise of the moving average removed;
- ``batch``: with each test image's own statistics (the running statistics dropped, so BN
  normalises with its batch's even in eval mode; detectron2 tests one image per batch): the
  normalisation a 1-image-per-batch run trained with, exactly so in the backbone and FPN (the
  ROI heads' batch is the image's regions: sampled ones in training, proposals at test).
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

__all__ = ["MODES", "bn_layers", "evaluate_bn_modes", "load_run", "with_statistics"]

MODES = ("running", "precise", "batch")


def bn_layers(model: nn.Module):
    """The model's BatchNorm layers that normalise with batch statistics in training (BN,
    SyncBN, detectron2's naiveSyncBN; not FrozenBN, which has none)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def evaluate_bn_modes(
    run_dir,
    *,
    datasets: Sequence[str] = (),
    precise_images: int = 200,
    modes: Sequence[str] = MODES,
) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """Box and mask AP of the run in ``run_dir`` (its ``config.yaml`` and ``model_final.pth``)
    on each of ``datasets`` (default: the config's test datasets), under each of ``modes``:
    ``{mode: {dataset: (box AP, mask AP)}}``. ``precise`` recomputes the statistics over
    ``precise_images`` training images (rounded up to whole batches of the run's
    ``SOLVER.IMS_PER_BATCH``). A model without BN layers is refused: its modes are all one.
    """
    from gn_det.engine import Trainer

    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"modes must be among {MODES}, got {list(modes)}")
    if precise_images < 1:
        raise ValueError(f"precise_images must be positive, got {precise_images}")
    cfg, trained = load_run(run_dir)
    if datasets:
        cfg.DATASETS.TEST = tuple(datasets)
    if not bn_layers(trained):
        raise ValueError(f"{run_dir}: the model has no BatchNorm layers, so every mode is the same")

    def evaluate(model) -> Dict[str, Tuple[float, float]]:
        with tempfile.TemporaryDirectory() as out:
            cfg.OUTPUT_DIR = out
            results = Trainer.test(cfg, model)
        if len(cfg.DATASETS.TEST) == 1:
            results = {cfg.DATASETS.TEST[0]: results}
        # AP is NaN where the model detects nothing: 0, as in the run's own record.
        return {
            name: tuple(
                0.0 if math.isnan(ap) else ap
                for ap in (float(r["bbox"]["AP"]), float(r.get("segm", {}).get("AP", 0.0)))
            )
            for name, r in results.items()
        }

    return {
        mode: evaluate(with_statistics(trained, mode, cfg, precise_images=precise_images))
        for mode in modes
    }


def load_run(run_dir, checkpoint: str = "model_final.pth"):
    """The config (``run_dir/config.yaml``, on CPU) and the trained model (``run_dir``'s
    ``checkpoint``, by default the final one) of a run."""
    from detectron2.modeling import build_model

    from gn_det.checkpoint import Checkpointer
    from gn_det.cli.config_files import load_config

    weights = Path(run_dir) / checkpoint
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: no such checkpoint (for model_final.pth: no finished run)"
        )
    cfg = load_config(Path(run_dir) / "config.yaml")
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    Checkpointer(model).load_weights(str(weights))
    return cfg, model


def with_statistics(
    model: nn.Module, mode: str, cfg=None, *, precise_images: int = 200
) -> nn.Module:
    """A copy of the detectron2 ``model`` in eval mode whose BN layers normalise with the
    ``mode``'s statistics (see the module's docstring); ``precise`` needs the run's ``cfg`` (its
    training data and ``SOLVER.IMS_PER_BATCH``)."""
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage
    from fvcore.nn.precise_bn import update_bn_stats

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = copy.deepcopy(model)
    if mode == "precise":
        if cfg is None:
            raise ValueError(
                "precise statistics need the run's config (its training data and batch)"
            )
        model.train()  # the R-CNN's training forward: sampled proposals, as in training
        with EventStorage(), torch.no_grad():
            update_bn_stats(
                model,
                iter(build_detection_train_loader(cfg)),
                num_iters=-(-precise_images // cfg.SOLVER.IMS_PER_BATCH),
            )
    elif mode == "batch":
        # Without running statistics a BN layer normalises with its batch's in eval mode too
        # (detectron2's inference sets eval mode; its test loader's batch is one image).
        for layer in bn_layers(model):
            layer.running_mean = layer.running_var = None
            layer.track_running_stats = False
    return model.eval()
