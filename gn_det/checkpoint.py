"""Checkpoint loading for training and evaluation.

``Checkpointer`` is detectron2's ``DetectionCheckpointer`` that also takes a plain torchvision
ImageNet ResNet state dict (``conv1``, ``bn1``, ``layer1..4``, ``fc``) for models built on
gn_det's torchvision backbone, mapping it under ``backbone.bottom_up.``. BN state in it is
transferred into converted GN layers on load (``ConvertedGroupNorm``).
"""

from __future__ import annotations

import logging

from detectron2.checkpoint import DetectionCheckpointer

from .modeling import torchvision_resnet_to_detectron2_state_dict

__all__ = ["Checkpointer"]

logger = logging.getLogger(__name__)

_TORCHVISION_PREFIX = "backbone.bottom_up."


class Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also maps torchvision ResNet weights (see module doc)."""

    def _load_file(self, filename: str):
        loaded = super()._load_file(filename)
        state = loaded.get("model")
        if isinstance(state, dict) and self._takes_torchvision_keys():
            try:
                loaded["model"] = torchvision_resnet_to_detectron2_state_dict(
                    state, prefix=_TORCHVISION_PREFIX
                )
            except ValueError:
                return loaded  # not a torchvision ResNet: detectron2's formats, as before
            logger.info("%s: torchvision ResNet weights, mapped under '%s'.", filename, _TORCHVISION_PREFIX)
        return loaded

    def _takes_torchvision_keys(self) -> bool:
        return any(k.startswith(_TORCHVISION_PREFIX + "layer1.") for k in self.model.state_dict())
