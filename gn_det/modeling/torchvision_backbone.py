"""torchvision's ResNet, which hard-codes ``nn.BatchNorm2d``, as a detectron2 FPN backbone:
``MODEL.RESNETS.NORM`` cannot reach it, so conversion is the only way to give it GroupNorm.

``MODEL.BACKBONE.NAME: "build_torchvision_resnet_fpn_backbone"`` selects it; it reads
``MODEL.RESNETS.DEPTH``, ``OUT_FEATURES``, ``NUM_GROUPS``, ``WIDTH_PER_GROUP``,
``RES5_DILATION``, ``MODEL.BACKBONE.FREEZE_AT``, ``MODEL.FPN.*`` and
``MODEL.TORCHVISION_RESNET``. torchvision's ImageNet weights want RGB input normalised with
:data:`TORCHVISION_PIXEL_MEAN` / :data:`TORCHVISION_PIXEL_STD` (``INPUT.FORMAT: "RGB"``), and
load by a fixed prefix (:func:`torchvision_resnet_to_detectron2_state_dict`; docs/configs.md).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
import torchvision
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from ..checkpoint.torchvision_names import torchvision_resnet_to_detectron2_state_dict
from ..config import add_torchvision_backbone_config  # noqa: F401  (its keys; re-exported)

__all__ = [
    "TORCHVISION_PIXEL_MEAN",
    "TORCHVISION_PIXEL_STD",
    "TorchvisionResNet",
    "add_torchvision_backbone_config",
    "build_torchvision_resnet_backbone",
    "build_torchvision_resnet_fpn_backbone",
    "torchvision_resnet_to_detectron2_state_dict",
]

logger = logging.getLogger(__name__)

#: MODEL.PIXEL_MEAN for torchvision's ImageNet weights (RGB, 0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
#: MODEL.PIXEL_STD for torchvision's ImageNet weights (RGB, 0-255 scale).
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}
# detectron2's feature names for torchvision's stages.
_STAGES = (("res2", "layer1"), ("res3", "layer2"), ("res4", "layer3"), ("res5", "layer4"))


class TorchvisionResNet(Backbone):
    """The stem and stages of a torchvision ``ResNet`` as a detectron2 ``Backbone``, under their
    torchvision names (``conv1``, ``bn1``, ``layer1`` ...); ``avgpool``, ``fc`` and stages after
    the last requested feature are dropped.

    Args:
        resnet: a ``torchvision.models.ResNet`` (any depth, width or groups).
        out_features: among ``"stem"``, ``"res2"`` ... ``"res5"`` (strides 4, 4, 8, 16, 32).
        freeze_at: detectron2's ``FREEZE_AT``, as in its ``ResNet.freeze``: frozen parts get
            ``requires_grad=False`` and ``FrozenBatchNorm2d``.
    """

    def __init__(self, resnet: torchvision.models.ResNet, out_features: Sequence[str],
                 freeze_at: int = 0):
        super().__init__()
        valid = ["stem"] + [name for name, _ in _STAGES]
        unknown = [f for f in out_features if f not in valid]
        if not out_features or unknown:
            raise ValueError(
                f"out_features must be a non-empty subset of {valid}, got {list(out_features)}")
        self.conv1, self.bn1, self.relu, self.maxpool = (resnet.conv1, resnet.bn1, resnet.relu,
                                                         resnet.maxpool)
        self._out_features = [f for f in valid if f in out_features]
        self._out_feature_channels = {"stem": resnet.conv1.out_channels}
        self._out_feature_strides = {"stem": 4}
        self._stage_names: List[str] = []
        last = valid.index(self._out_features[-1])
        stride = 4
        for feature, attribute in _STAGES[:last]:
            stage: nn.Sequential = getattr(resnet, attribute)
            stride *= max(m.stride[0] for m in stage[0].modules() if isinstance(m, nn.Conv2d))
            convs = [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)]
            self.add_module(attribute, stage)
            self._stage_names.append(attribute)
            self._out_feature_channels[feature] = convs[-1].out_channels
            self._out_feature_strides[feature] = stride
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "TorchvisionResNet":
        """Freeze the stem (``freeze_at >= 1``) and the first ``freeze_at - 1`` stages."""
        stem = ["conv1", "bn1"] if freeze_at >= 1 else []
        frozen = stem + self._stage_names[: max(freeze_at - 1, 0)]
        for name in frozen:
            module = getattr(self, name)
            for p in module.parameters():
                p.requires_grad = False
            self.add_module(name, FrozenBatchNorm2d.convert_frozen_batchnorm(module))
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, 3, H, W) normalised images -> {feature: (N, C, H / stride, W / stride)}."""
        assert x.dim() == 4, f"TorchvisionResNet takes input of shape (N, C, H, W). Got {x.shape}!"
        outputs = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if "stem" in self._out_features:
            outputs["stem"] = x
        for (feature, _), attribute in zip(_STAGES, self._stage_names):
            x = getattr(self, attribute)(x)
            if feature in self._out_features:
                outputs[feature] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}


def build_torchvision_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> TorchvisionResNet:
    """The bottom-up :class:`TorchvisionResNet` a config describes; ``ValueError`` for what
    torchvision's ResNet cannot build (depth, channels, groups of basic blocks, dilation)."""
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _RESNETS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={depth}: torchvision's ResNet has depths {sorted(_RESNETS)}")
    if input_shape.channels not in (None, 3):
        raise ValueError(
            f"torchvision's ResNet takes 3-channel images; the input has {input_shape.channels}")
    groups, width = cfg.MODEL.RESNETS.NUM_GROUPS, cfg.MODEL.RESNETS.WIDTH_PER_GROUP
    dilation = cfg.MODEL.RESNETS.RES5_DILATION
    if depth < 50 and (groups, width, dilation) != (1, 64, 1):
        raise ValueError(
            f"ResNet-{depth} (basic blocks) needs MODEL.RESNETS.NUM_GROUPS=1, WIDTH_PER_GROUP=64 "
            f"and RES5_DILATION=1; got {groups}, {width} and {dilation}")
    if dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {dilation}")
    options = cfg.MODEL.get("TORCHVISION_RESNET")
    if options is None:
        raise KeyError(
            "cfg.MODEL.TORCHVISION_RESNET is missing: call "
            "gn_det.modeling.add_torchvision_backbone_config(cfg) (or gn_det's "
            "add_gn_det_config) before merging the config")
    kwargs = {"zero_init_residual": options.ZERO_INIT_RESIDUAL}
    if depth >= 50:
        kwargs.update(groups=groups, width_per_group=width,
                      replace_stride_with_dilation=[False, False, dilation == 2])
    resnet = _RESNETS[depth](weights=None, **kwargs)
    return TorchvisionResNet(resnet, out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
                             freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_torchvision_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """detectron2's FPN (norm ``MODEL.FPN.NORM``) and max-pooled P6 on a
    :class:`TorchvisionResNet`, as ``build_resnet_fpn_backbone`` builds them on detectron2's."""
    fpn = cfg.MODEL.FPN
    return FPN(bottom_up=build_torchvision_resnet_backbone(cfg, input_shape),
               in_features=fpn.IN_FEATURES, out_channels=fpn.OUT_CHANNELS, norm=fpn.NORM,
               top_block=LastLevelMaxPool(), fuse_type=fpn.FUSE_TYPE)
