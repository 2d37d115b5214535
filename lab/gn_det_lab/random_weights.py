"""Randomly initialised detectors that behave like trained ones, for benchmarks and smoke runs."""

from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import nn

__all__ = ["SMALL_MODEL_OPTS", "normalize_norm_statistics"]

#: Overrides that shrink an R-50-FPN Mask R-CNN config (any of its norms) to the size of the
#: shapes model: R-18, FPN and heads 64 wide, fewer proposals and sampled regions. The tools'
#: smoke runs (the tests) build it in place of R-50: the same code paths, a fraction of the work.
SMALL_MODEL_OPTS = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.FPN.OUT_CHANNELS",
    "64",
    "MODEL.ROI_BOX_HEAD.CONV_DIM",
    "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "256",
    "MODEL.ROI_MASK_HEAD.CONV_DIM",
    "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "64",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "100",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "50",
]


def normalize_norm_statistics(
    model: nn.Module, batch: list, types: Tuple[Type[nn.Module], ...] = ()
) -> None:
    """Set the statistics of every norm of ``types`` (default: detectron2's FrozenBN) in a
    detectron2 model's backbone to those of its input on ``batch`` (one forward pass).

    From random weights, identity statistics (mean 0, variance 1) leave an R-50 unnormalised:
    its activations grow stage by stage until they overflow (float16 first), which changes what
    the detector computes (NaN boxes are dropped). A trained backbone is normalised, and this
    makes the random one so too.
    """
    from detectron2.layers import FrozenBatchNorm2d

    types = types or (FrozenBatchNorm2d,)

    def set_statistics(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    hooks = [
        m.register_forward_pre_hook(set_statistics) for m in model.modules() if isinstance(m, types)
    ]
    try:
        with torch.no_grad():
            model.backbone(model.preprocess_image(batch).tensor)
    finally:
        for hook in hooks:
            hook.remove()
