"""torchvision ResNet state dicts mapped onto gn_det's torchvision backbone, which keeps
torchvision's module names (``conv1``, ``layer1.0.downsample.1``, ...): the map is a prefix."""

from __future__ import annotations

import collections
import logging
import re
from typing import Mapping, Sequence

import torch

__all__ = ["torchvision_resnet_to_detectron2_state_dict"]

logger = logging.getLogger(__name__)

_TORCHVISION_RESNET_KEY = re.compile(r"^(conv1|bn1|layer[1-4]|fc)\.")
_REQUIRED_KEYS = (
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "layer1.0.conv1.weight",
)


def torchvision_resnet_to_detectron2_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone.bottom_up."
) -> "collections.OrderedDict[str, torch.Tensor]":
    """
    Map torchvision ResNet weights onto a model with a :class:`gn_det.modeling.TorchvisionResNet`.

    ``fc.*`` (the ImageNet classifier) is dropped and every other key gets ``prefix``
    (``"backbone.bottom_up."`` in a detectron2 meta-architecture, ``""`` for the backbone on its
    own). The result loads with ``strict=False`` and no unexpected keys, or with detectron2's
    ``DetectionCheckpointer`` as ``{"model": result}``; BN running statistics come along, for
    gn_det's ``stats`` transfer. Returns a new ordered dict, tensors shared with ``state_dict``.

    Raises:
        ValueError: ``state_dict`` is not a torchvision ResNet state dict (a key outside
            ``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``, or the stem missing), e.g. a
            detectron2 checkpoint, a DDP one (``module.`` prefix) or a wrapper dict.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"Expected a torchvision ResNet state dict, got {type(state_dict).__name__}"
        )
    foreign = [
        k for k in state_dict if not (isinstance(k, str) and _TORCHVISION_RESNET_KEY.match(k))
    ]
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    problems = [f"{what}: {_preview(keys)}" for what, keys in (
        ("keys outside conv1/bn1/layer1-4/fc", foreign), ("missing keys", missing)) if keys]
    if problems:
        raise ValueError(
            "Not a torchvision ResNet state dict (" + "; ".join(problems) + "). Pass "
            "torchvision.models.resnet*().state_dict() or a file of one; unwrap checkpoints that "
            "nest it (e.g. under 'model' or 'state_dict') and strip DDP's 'module.' prefix first."
        )
    mapped = collections.OrderedDict(
        (prefix + k, v) for k, v in state_dict.items() if not k.startswith("fc.")
    )
    logger.info(
        "Mapped %d torchvision ResNet tensors to '%s*' (dropped %d fc tensors).",
        len(mapped),
        prefix,
        len(state_dict) - len(mapped),
    )
    return mapped


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
