"""torchvision's ResNet (hard-coded BatchNorm) as a detectron2 FPN backbone, and its conversion."""

import pytest
import torch
import torchvision
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from torch import nn

from gn_det import NORM_SOURCES, ConvertedGroupNorm, convert_norm
from gn_det.modeling import (
    TORCHVISION_PIXEL_MEAN,
    TORCHVISION_PIXEL_STD,
    TorchvisionResNet,
    add_torchvision_backbone_config,
    build_torchvision_resnet_backbone,
    torchvision_resnet_to_detectron2_state_dict,
)

BACKBONE = "build_torchvision_resnet_fpn_backbone"
MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _cfg(**overrides):
    cfg = get_cfg()
    add_torchvision_backbone_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(MASK_RCNN))
    cfg.MODEL.BACKBONE.NAME = BACKBONE
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = list(TORCHVISION_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(TORCHVISION_PIXEL_STD)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def _torchvision_state(depth=50, seed=1):
    """A torchvision ResNet state dict with non-trivial BN affine and running statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1000)
    return model, model.state_dict()


def _stats_transfer(gamma, beta, mean, var, num_groups, eps):
    """The `stats` transfer of docs/design.md: M_g, S_g² = mean(σ² + (μ − M_g)²),
    γ' = γ S_g/σ, β' = ..."""
    gamma, beta, mean, var = (t.double().view(num_groups, -1) for t in (gamma, beta, mean, var))
    sigma2 = var + eps
    group_mean = mean.mean(1, keepdim=True)
    group_std = (sigma2 + (mean - group_mean) ** 2).mean(1, keepdim=True).sqrt()
    new_gamma = gamma * group_std / sigma2.sqrt()
    new_beta = beta - gamma * (mean - group_mean) / sigma2.sqrt()
    return new_gamma.flatten().float(), new_beta.flatten().float()


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory):
    """A resnet50 state dict saved as torchvision does, and its reloaded contents."""
    _, state = _torchvision_state(50)
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(state, path)
    return path, torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg())


def _assert_norms_are_gn(module):
    left = [
        name
        for name, m in module.named_modules()
        if not isinstance(m, nn.GroupNorm) and NORM_SOURCES.lookup(m) is not None
    ]
    assert left == []


def test_registered_and_shapes(model):
    assert BACKBONE_REGISTRY.get(BACKBONE) is not None
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, TorchvisionResNet)
    assert {k: (v.channels, v.stride) for k, v in bottom_up.output_shape().items()} == {
        "res2": (256, 4),
        "res3": (512, 8),
        "res4": (1024, 16),
        "res5": (2048, 32),
    }
    assert {k: (v.channels, v.stride) for k, v in model.backbone.output_shape().items()} == {
        f"p{i}": (256, 2**i) for i in range(2, 7)
    }
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.backbone(x)
    for name, spec in model.backbone.output_shape().items():
        assert features[name].shape == (1, 256, -(-64 // spec.stride), -(-96 // spec.stride))


def test_bottom_up_has_torchvision_module_names(model):
    reference = torchvision.models.resnet50(weights=None).state_dict()
    expected = {k for k in reference if not k.startswith("fc.")}
    assert set(model.backbone.bottom_up.state_dict()) == expected


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3])
def test_freeze_at(freeze_at):
    cfg = _cfg(**{"MODEL.RESNETS.DEPTH": 18, "MODEL.BACKBONE.FREEZE_AT": freeze_at})
    bottom_up = build_torchvision_resnet_backbone(cfg, ShapeSpec(channels=3))
    frozen = (["conv1", "bn1"] if freeze_at >= 1 else []) + list(STAGES[: max(freeze_at - 1, 0)])
    for name, p in bottom_up.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    for name, m in bottom_up.named_modules():
        if "bn" in name.split(".")[-1] or name.endswith("downsample.1"):
            expected = FrozenBatchNorm2d if name.split(".")[0] in frozen else nn.BatchNorm2d
            assert type(m) is expected, name


def test_depth_18_and_config_options():
    cfg = _cfg(
        **{"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.OUT_FEATURES": ["stem", "res2", "res3"]}
    )
    bottom_up = build_torchvision_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert {k: (v.channels, v.stride) for k, v in bottom_up.output_shape().items()} == {
        "stem": (64, 4),
        "res2": (64, 4),
        "res3": (128, 8),
    }
    assert not hasattr(bottom_up, "layer3") and not hasattr(bottom_up, "fc")

    cfg = _cfg(
        **{"MODEL.RESNETS.RES5_DILATION": 2, "MODEL.TORCHVISION_RESNET.ZERO_INIT_RESIDUAL": True}
    )
    bottom_up = build_torchvision_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert bottom_up.output_shape()["res5"].stride == 16
    blocks = [block for stage in STAGES for block in getattr(bottom_up, stage)]
    assert all(torch.all(block.bn3.weight == 0) for block in blocks)

    for overrides, shape in [
        ({"MODEL.RESNETS.DEPTH": 26}, ShapeSpec(channels=3)),
        ({"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.NUM_GROUPS": 32}, ShapeSpec(channels=3)),
        ({}, ShapeSpec(channels=1)),
    ]:
        with pytest.raises(ValueError):
            build_torchvision_resnet_backbone(_cfg(**overrides), shape)


def test_features_equal_torchvision_layers():
    reference, state = _torchvision_state(18)
    reference.eval()
    cfg = _cfg(**{"MODEL.RESNETS.DEPTH": 18, "MODEL.BACKBONE.FREEZE_AT": 2})
    bottom_up = build_torchvision_resnet_backbone(cfg, ShapeSpec(channels=3))
    incompatible = bottom_up.load_state_dict(
        torchvision_resnet_to_detectron2_state_dict(state, prefix=""), strict=True
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    bottom_up.eval()

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = bottom_up(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for feature, stage in zip(("res2", "res3", "res4", "res5"), STAGES):
            y = getattr(reference, stage)(y)
            torch.testing.assert_close(features[feature], y)


def test_torchvision_weights_load_then_convert(torchvision_checkpoint, tmp_path):
    path, state = torchvision_checkpoint
    torch.manual_seed(0)
    model = build_model(_cfg())
    mapped = torchvision_resnet_to_detectron2_state_dict(state)
    assert not any(k.startswith("backbone.bottom_up.fc.") for k in mapped)
    incompatible = model.load_state_dict(mapped, strict=False)
    assert incompatible.unexpected_keys == []
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]

    # Through detectron2's checkpointer, as MODEL.WEIGHTS would load it.
    d2_path = tmp_path / "resnet50_d2.pth"
    torch.save({"model": mapped}, d2_path)
    torch.manual_seed(0)
    model = build_model(_cfg())
    DetectionCheckpointer(model).load(str(d2_path))
    bottom_up = model.backbone.bottom_up
    assert type(bottom_up.bn1) is FrozenBatchNorm2d
    assert type(bottom_up.layer2[0].bn1) is nn.BatchNorm2d
    torch.testing.assert_close(bottom_up.bn1.running_var, state["bn1.running_var"])
    torch.testing.assert_close(
        bottom_up.layer3[1].bn2.weight.detach(), state["layer3.1.bn2.weight"]
    )

    model = convert_norm(model)
    _assert_norms_are_gn(model)
    gn = [m for m in model.backbone.bottom_up.modules() if isinstance(m, ConvertedGroupNorm)]
    assert len(gn) == 53  # stem, 16 bottlenecks x 3, 4 shortcuts
    # Frozen in, frozen out: the stem and layer1 (FREEZE_AT=2) stay frozen.
    for name, p in model.backbone.bottom_up.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in ("conv1", "bn1", "layer1")), name

    model.eval()
    image = torch.rand(3, 64, 96) * 255
    with torch.no_grad():
        outputs = model([{"image": image, "height": 64, "width": 96}])
    assert outputs[0]["instances"].image_size == (64, 96)


def test_loading_into_converted_model_applies_stats_transfer(torchvision_checkpoint):
    _, state = torchvision_checkpoint
    torch.manual_seed(0)
    model = convert_norm(build_model(_cfg()))
    mapped = torchvision_resnet_to_detectron2_state_dict(state)
    incompatible = model.load_state_dict(mapped, strict=False)
    assert incompatible.unexpected_keys == []
    bottom_up = model.backbone.bottom_up
    for layer, key in [(bottom_up.layer2[0].bn1, "layer2.0.bn1"), (bottom_up.bn1, "bn1")]:
        assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 32
        gamma, beta = _stats_transfer(
            *(state[f"{key}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")),
            num_groups=32,
            eps=1e-5,
        )
        torch.testing.assert_close(layer.weight.detach(), gamma)
        torch.testing.assert_close(layer.bias.detach(), beta)
    assert not bottom_up.bn1.weight.requires_grad


def test_not_a_torchvision_resnet_state_dict(model):
    _, state = _torchvision_state(18)
    for bad in [
        model.state_dict(),  # detectron2 format
        {f"module.{k}": v for k, v in state.items()},  # DDP
        {"model": state},  # wrapped
        {"fc.weight": state["fc.weight"]},  # only a classifier
        [("conv1.weight", state["conv1.weight"])],
    ]:
        with pytest.raises(ValueError, match="torchvision ResNet"):
            torchvision_resnet_to_detectron2_state_dict(bad)
