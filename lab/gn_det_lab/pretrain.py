"""ImageNet pretraining in miniature: an R-18 body trained on a proxy task made from the shapes
generator, with BN or GN, which then becomes a detector backbone (``lab/tools/backbone_study.py``).

**The proxy** (:data:`PROXY`): 96x96 images of the shapes generator, 1-3 shapes each, with
their own base seed (so no image is one of the detection splits'). The task is **per-pixel
classification**: each pixel's class (background or one of the 4 shapes, from the visible
masks). Image-level labels were tried first and taught nothing within this study's budget
(measured: still at chance after 800 steps of 64 multi-label 96x96 images, and after 2,400
steps of 32 single-shape 64x64 images; a shape here is told from its textured background by
its outline alone, and one label per image says nowhere where to look). Dense labels start
learning within a few hundred steps. Rendered on the fly (1.5 ms per image): nothing cached.

**The network**: detectron2's ResNet-18 body exactly as the shapes Mask R-CNN builds it
(64-wide res2, stride in the 3x3, no frozen stage, detectron2's input normalisation), the norm
``BN`` or ``GN`` (32 groups), and a linear (1x1) classifier on each of res3, res4 and res5,
summed at res3's stride and upsampled (an FCN-8s-like head, discarded afterwards). The body's
weights are saved in detectron2's ImageNet-pretrained format (``stem.conv1.weight``,
``res2.0.conv1.norm.*``, matched by name), so ``MODEL.WEIGHTS`` of a shapes config loads
them, and ``gn-det convert`` converts the BN one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gn_det.data.shapes import SHAPE_CLASSES, ShapesSpec, render_shapes_image

__all__ = [
    "PROXY",
    "PixelClassifier",
    "proxy_batch",
    "proxy_labels",
    "pretrain",
    "write_proxy_images",
]

logger = logging.getLogger(__name__)

#: The proxy classification task: the shapes generator at 96x96, 1-3 shapes, its own seed.
PROXY = ShapesSpec(
    image_size=(96, 96),
    num_train=20000,
    num_val=1000,
    num_test=0,
    seed=11,
    min_instances=1,
    max_instances=3,
    min_scale=0.25,
    max_scale=0.7,
    max_clutter_lines=2,
)


def proxy_labels(spec: ShapesSpec, split: str, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of ``split`` (uint8 HxWx3 RGB) and its label map (int64 HxW: 0 for
    background, a visible shape's category id 1-4 where it is)."""
    rendered = render_shapes_image(spec, split, index)
    labels = np.zeros(rendered.image.shape[:2], dtype=np.int64)
    for instance in rendered.instances:
        labels[instance.mask] = instance.category_id
    return rendered.image, labels


def proxy_batch(spec: ShapesSpec, split: str, indices, *, flip: Optional[np.ndarray] = None):
    """Images (N, 3, H, W) float in 0-255, RGB, and label maps (N, H, W) of ``indices``;
    ``flip`` (bool per image) mirrors both horizontally (the training augmentation)."""
    images, labels = zip(*(proxy_labels(spec, split, int(i)) for i in indices))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(np.stack(labels))
    if flip is not None:
        mirrored = torch.from_numpy(flip)
        x[mirrored], y[mirrored] = x[mirrored].flip(-1), y[mirrored].flip(-1)
    return x, y


def write_proxy_images(spec: ShapesSpec, split: str, count: int, folder) -> Path:
    """The first ``count`` images of ``split`` as PNG files in ``folder`` (unlabeled images for
    ``gn-det convert --calib-images-dir``); returns the folder."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{split}_{i:05d}.png"
        if not path.is_file():
            Image.fromarray(proxy_labels(spec, split, i)[0]).save(path)
    return folder


class PixelClassifier(nn.Module):
    """detectron2's ResNet-18 body (the shapes detector's) + a 1x1 classifier on res3, res4 and
    res5, summed at res3's stride (8) and upsampled to the input: per-pixel class logits.

    Inputs are RGB in 0-255, normalised as the shapes configs do (detectron2's defaults: BGR
    order, mean subtracted, std 1), so the body sees what it will see in the detector.
    """

    LEVELS = {"res3": 128, "res4": 256, "res5": 512}

    def __init__(self, norm: str, num_classes: int = len(SHAPE_CLASSES) + 1):
        super().__init__()
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.resnet import build_resnet_backbone

        from gn_det.config import get_cfg

        cfg = get_cfg()
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        cfg.MODEL.RESNETS.NORM = norm
        cfg.MODEL.RESNETS.OUT_FEATURES = list(self.LEVELS)
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        self.body = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        self.heads = nn.ModuleDict(
            {k: nn.Conv2d(c, num_classes, 1) for k, c in self.LEVELS.items()}
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1), False
        )
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1), False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        features = self.body((rgb.flip(1) - self.pixel_mean) / self.pixel_std)  # RGB -> BGR
        logits = self.heads["res3"](features["res3"])
        for level in ("res4", "res5"):
            logits = logits + F.interpolate(
                self.heads[level](features[level]),
                size=logits.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
        return F.interpolate(logits, size=rgb.shape[-2:], mode="bilinear", align_corners=False)

    def backbone_state(self) -> Dict[str, torch.Tensor]:
        """The body's weights under detectron2's ImageNet-pretrained names."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.body.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }


def _parameter_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """No weight decay on norms and biases (as detectron2's WEIGHT_DECAY_NORM 0)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            norm = isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
            (no_decay if norm or name == "bias" else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(
    model: PixelClassifier, spec: ShapesSpec, split: str = "val", batch: int = 50
) -> Dict[str, float]:
    """On every image of ``split``, the model in eval mode: ``pixel_accuracy`` (all pixels),
    ``shape_accuracy`` (the pixels of shapes given their right class: background everywhere
    scores 0 here) and ``miou`` (mean intersection over union of the 5 classes)."""
    training = model.training
    model.eval()
    classes = len(spec.classes) + 1
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    for start in range(0, spec.num_images(split), batch):
        x, y = proxy_batch(spec, split, range(start, min(start + batch, spec.num_images(split))))
        predicted = model(x).argmax(1)
        confusion += torch.bincount(
            y.flatten() * classes + predicted.flatten(), minlength=classes**2
        ).view(classes, classes)
    model.train(training)
    right = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    return {
        "pixel_accuracy": float(right.sum() / confusion.sum()),
        "shape_accuracy": float(right[1:].sum() / confusion[1:].sum()),
        "miou": float((right / union.clamp_min(1)).mean()),
    }


def pretrain(
    norm: str,
    output_dir,
    *,
    steps: int = 4000,
    batch_size: int = 32,
    lr: float = 0.02,
    weight_decay: float = 1e-4,
    warmup: int = 100,
    eval_period: int = 250,
    seed: int = 0,
    spec: ShapesSpec = PROXY,
    autocast: bool = True,
) -> dict:
    """Train the :class:`PixelClassifier` with ``norm`` on ``spec``'s train split; write
    ``metrics.jsonl`` (loss every 10 steps, val metrics every ``eval_period``),
    ``backbone.pkl`` (the body, detectron2's ImageNet format) and ``result.json`` into
    ``output_dir``. SGD with momentum 0.9, linear warmup then cosine decay, random horizontal
    flips, each step a fresh random batch of the train split; bfloat16 autocast where the CPU
    has it (``autocast``). Returns the result record. A finished run (its ``result.json``) is
    read back, not retrained.
    """
    from gn_det.checkpoint.io import save_checkpoint_file
    from gn_det.engine import cpu_bfloat16_supported

    output_dir = Path(output_dir)
    done = output_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = PixelClassifier(norm).train()
    optimizer = torch.optim.SGD(_parameter_groups(model, weight_decay), lr=lr, momentum=0.9)
    rng = np.random.default_rng(seed)
    bf16 = autocast and cpu_bfloat16_supported()
    metrics = open(output_dir / "metrics.jsonl", "w")
    start = time.perf_counter()
    losses = []
    for step in range(1, steps + 1):
        factor = (
            step / warmup
            if step <= warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        indices = rng.integers(0, spec.num_train, batch_size)
        x, y = proxy_batch(spec, "train", indices, flip=rng.random(batch_size) < 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{norm} pretraining: loss {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        record = None
        if step % 10 == 0:
            record = {"step": step, "loss": float(np.mean(losses[-10:])), "lr": lr * factor}
        if step % eval_period == 0 or step == steps:
            record = {
                **(record or {"step": step}),
                **{f"val_{k}": v for k, v in evaluate(model, spec).items()},
                "seconds": time.perf_counter() - start,
            }
            logger.info("%s pretraining step %d: %s", norm, step, record)
        if record:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
    metrics.close()
    save_checkpoint_file(
        {
            "model": model.backbone_state(),
            "__author__": f"gn_det backbone study ({norm})",
            "matching_heuristics": True,
        },
        output_dir / "backbone.pkl",
        file_format="pkl",
        overwrite=True,
    )
    result = {
        "norm": norm,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "bf16": bf16,
        "seconds": time.perf_counter() - start,
        **{f"val_{k}": v for k, v in evaluate(model, spec).items()},
    }
    done.write_text(json.dumps(result))
    return result
