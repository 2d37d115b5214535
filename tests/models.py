"""Small models shared by the tests."""

import torch
from detectron2 import model_zoo
from detectron2.modeling import build_backbone

import gn_det


def resnet18_fpn_backbone(freeze_at: int, seed: int = 0):
    """detectron2's ResNet-18 + FPN (64 channels) with BN in both, built with a fixed seed."""
    cfg = gn_det.get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.FPN.NORM = "BN"
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    torch.manual_seed(seed)
    return build_backbone(cfg)
