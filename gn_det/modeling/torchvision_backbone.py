"""
torchvision's ResNet (which hard-codes ``nn.BatchNorm2d``) as a detectron2 FPN backbone.

detectron2's ``MODEL.RESNETS.NORM`` and ``MODEL.FPN.NORM`` choose the norm of detectron2's own
ResNet; they cannot reach a backbone that builds its norm layers itself. This backbone is such a
one — torchvision's ``resnet{18,34,50,101,152}(weights=None)`` exactly as torchvision builds it —
so ``gn_det.convert_norm`` (or ``MODEL.NORM_CONVERSION``) is the only way to give it GroupNorm.

Select it with ``MODEL.BACKBONE.NAME: "build_torchvision_resnet_fpn_backbone"``. It reads
``MODEL.RESNETS.DEPTH``, ``OUT_FEATURES``, ``NUM_GROUPS``, ``WIDTH_PER_GROUP`` and
``RES5_DILATION``, ``MODEL.BACKBONE.FREEZE_AT``, ``MODEL.FPN.*`` and the keys that
:func:`add_torchvision_backbone_config` adds. ``MODEL.RESNETS.NORM``, ``STRIDE_IN_1X1`` (torchvision
strides in the 3x3 conv), ``STEM_OUT_CHANNELS`` and ``RES2_OUT_CHANNELS`` do not apply.

Input: torchvision's ImageNet weights expect RGB images on a 0-255 scale normalised with
ImageNet's mean and std, so a config that loads them should set::

    INPUT.FORMAT: "RGB"
    MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]
    MODEL.PIXEL_STD: [58.395, 57.12, 57.375]

(detectron2's defaults, BGR with std 1, are for MSRA's Caffe2 weights.)

Weights: the bottom-up's module names are torchvision's (``conv1``, ``bn1``,
``layer1.0.downsample.1``, ...), so :func:`torchvision_resnet_to_detectron2_state_dict` maps a
torchvision ImageNet state dict onto the detection model by a fixed prefix.
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
    """
    The stem and stages of a torchvision ``ResNet`` as a detectron2 ``Backbone``.

    Its children are the torchvision model's own modules under their torchvision names
    (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` ... ``layer4``); ``avgpool``, ``fc`` and
    stages after the last requested feature are dropped, as detectron2's ResNet drops them.

    Args:
        resnet: a ``torchvision.models.ResNet`` (any depth, width or groups).
        out_features: among ``"stem"``, ``"res2"`` ... ``"res5"``; stride 4, 4, 8, 16, 32
            (res5: 16 when built with a dilated last stage).
        freeze_at: detectron2's ``FREEZE_AT``: 0 trains everything, 1 freezes the stem
            (``conv1``, ``bn1``), k > 1 also ``layer1`` ... ``layer{k-1}``. Frozen parts get
            ``requires_grad=False`` and their BatchNorm becomes detectron2's
            ``FrozenBatchNorm2d``, as in detectron2's ``ResNet.freeze``.
    """

    def __init__(
        self, resnet: torchvision.models.ResNet, out_features: Sequence[str], freeze_at: int = 0
    ):
        super().__init__()
        valid = ["stem"] + [name for name, _ in _STAGES]
        unknown = [f for f in out_features if f not in valid]
        if not out_features or unknown:
            raise ValueError(
                f"out_features must be a non-empty subset of {valid}, got {list(out_features)}"
            )
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
        )
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
        """
        Args:
            x: (N, 3, H, W) normalised images.

        Returns:
            dict of feature name -> (N, C, H / stride, W / stride) tensor, for ``out_features``.
        """
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
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def build_torchvision_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> TorchvisionResNet:
    """
    The bottom-up :class:`TorchvisionResNet` a config describes (see the module docstring).

    Raises:
        ValueError: an unsupported depth, input channel count, groups/width for a basic-block
            ResNet, or res5 dilation.
    """
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _RESNETS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={depth}: torchvision's ResNet has depths {sorted(_RESNETS)}"
        )
    if input_shape.channels not in (None, 3):
        raise ValueError(
            f"torchvision's ResNet takes 3-channel images; the input has {input_shape.channels}"
        )
    groups, width = cfg.MODEL.RESNETS.NUM_GROUPS, cfg.MODEL.RESNETS.WIDTH_PER_GROUP
    dilation = cfg.MODEL.RESNETS.RES5_DILATION
    if depth < 50 and (groups, width, dilation) != (1, 64, 1):
        raise ValueError(
            f"ResNet-{depth} (basic blocks) needs MODEL.RESNETS.NUM_GROUPS=1, WIDTH_PER_GROUP=64 "
            f"and RES5_DILATION=1; got {groups}, {width} and {dilation}"
        )
    if dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {dilation}")
    options = cfg.MODEL.get("TORCHVISION_RESNET")
    if options is None:
        raise KeyError(
            "cfg.MODEL.TORCHVISION_RESNET is missing: call "
            "gn_det.modeling.add_torchvision_backbone_config(cfg) (or gn_det's "
            "add_gn_det_config) before merging the config"
        )
    kwargs = {"zero_init_residual": options.ZERO_INIT_RESIDUAL}
    if depth >= 50:
        kwargs.update(
            groups=groups,
            width_per_group=width,
            replace_stride_with_dilation=[False, False, dilation == 2],
        )
    resnet = _RESNETS[depth](weights=None, **kwargs)
    return TorchvisionResNet(
        resnet, out_features=cfg.MODEL.RESNETS.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )


@BACKBONE_REGISTRY.register()
def build_torchvision_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """
    torchvision's ResNet with detectron2's FPN and a max-pooled P6, as detectron2's
    ``build_resnet_fpn_backbone`` builds it on its own ResNet. The FPN's norm is
    ``MODEL.FPN.NORM``; the ResNet's is always torchvision's ``nn.BatchNorm2d``.

    Returns:
        An ``FPN`` whose ``bottom_up`` is a :class:`TorchvisionResNet`.
    """
    return FPN(
        bottom_up=build_torchvision_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
