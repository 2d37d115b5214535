"""Small models and tiny training settings shared by the tests."""

import torch
from detectron2 import model_zoo
from detectron2.layers import Conv2d
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage
from torch import nn

import gn_det

#: Overrides for a 2-iteration run on the 6-image ``shapes_tiny`` set of the ``tiny_env`` fixture.
TINY = [
    "DATASETS.TRAIN",
    "('shapes_tiny_train',)",
    "DATASETS.TEST",
    "('shapes_tiny_val',)",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "DATALOADER.NUM_WORKERS",
    "0",
]


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


def photometric_images(n: int, seed: int) -> torch.Tensor:
    """Smooth random 32x32 images, each with its own brightness and contrast (which GN
    normalises away and BN keeps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 3, 36, 36, generator=g), 5, 1)
    return x * (torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.5) + torch.randn(
        n, 1, 1, 1, generator=g
    )


def bn_teacher_net() -> nn.Sequential:
    """Four conv-BN-ReLU blocks whose BN population statistics are computed on
    :func:`photometric_images`; the third BN layer is frozen. Eval mode."""
    torch.manual_seed(0)
    layers = []
    channels = [3, 32, 64, 64, 64]
    for i in range(4):
        layers += [
            nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, stride=1 + (i % 2)),
            nn.BatchNorm2d(channels[i + 1], momentum=None),
            nn.ReLU(),
        ]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for _ in range(4):
            model(photometric_images(64, seed=1))  # momentum=None: cumulative average
    model[4].requires_grad_(False)
    return model.eval()


def shapes_bn_mask_rcnn():
    """The shapes Mask R-CNN with BN everywhere (random weights), its BN population statistics
    computed on 4 random 96x128 images (returned too, as model inputs). Eval mode."""
    from gn_det.cli.config_files import load_config, resolve_config_name

    cfg = load_config(resolve_config_name("shapes/bn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(3, 96, 128, generator=g) * 255} for _ in range(4)]
    model.train()
    with torch.no_grad(), EventStorage():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.backbone(model.preprocess_image(images).tensor)
    return model.eval(), images


def randomize_norm_state(model, seed: int = 1):
    """Give every BN-family layer of ``model`` (``model`` itself may be one) non-trivial
    statistics and affine, as a trained model has; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if gn_det.NORM_SOURCES.lookup(m) is not None:
                c = m.running_mean.numel()
                if m.weight is not None:  # RetinaNet's CycleBatchNormList holds affine-free BN
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def gn_folding_net():
    """conv-GN-ReLU twice (detectron2 Conv2d), then a conv with a separate GN after it: the
    small net the folding tests (plugin and lab) fold."""
    torch.manual_seed(0)
    net = nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=False, norm=nn.GroupNorm(4, 8), activation=nn.ReLU()),
        Conv2d(8, 16, 3, padding=1, bias=False, norm=nn.GroupNorm(4, 16), activation=nn.ReLU()),
        nn.Conv2d(16, 8, 1),
        nn.GroupNorm(2, 8),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return net.eval()
