"""detectron2 modules that gn_det registers: importing this package registers them.

- ``build_torchvision_resnet_fpn_backbone`` (``BACKBONE_REGISTRY``): torchvision's ResNet, with
  its hard-coded BatchNorm, under detectron2's FPN.
"""

from . import torchvision_backbone
from .torchvision_backbone import *  # noqa: F401,F403  (registers the backbone)

__all__ = list(torchvision_backbone.__all__)
