"""detectron2 parts that gn_det registers: importing this package registers them.

- ``NormConverted`` (``META_ARCH_REGISTRY``): builds a config's architecture and converts it.
- ``build_torchvision_resnet_fpn_backbone`` (``BACKBONE_REGISTRY``): torchvision's ResNet, with
  its hard-coded BatchNorm, under detectron2's FPN.
"""

from . import torchvision_backbone
from .meta_arch import NormConverted, build_model
from .torchvision_backbone import *  # noqa: F403  (registers the backbone)

__all__ = ["NormConverted", "build_model", *torchvision_backbone.__all__]
