"""Conversion of detectron2's own model-zoo models (built from their configs, random weights)."""

import pytest
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from gn_det import NORM_SOURCES, ConvertedGroupNorm, convert_norm
from reference import stats_transfer_reference
from models import randomize_norm_state


def _cfg(name, **overrides):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def _build(name, **overrides):
    torch.manual_seed(0)
    return build_model(_cfg(name, **overrides))


def _norm_signature(model):
    """name -> (class family, channels, groups, eps, trainable) for every normalisation layer."""
    rows = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            rows[name] = ("GroupNorm", m.num_channels, m.num_groups, m.eps, m.weight.requires_grad)
    return rows


@pytest.fixture(scope="module")
def native_and_converted():
    native = _build("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml")
    syncbn = _build(
        "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml", **{"MODEL.RESNETS.STRIDE_IN_1X1": "False"}
    )
    return native, convert_norm(syncbn)


def test_converted_syncbn_model_has_the_modules_of_the_native_gn_model(native_and_converted):
    native, converted = native_and_converted
    native_modules = {n: type(m) for n, m in native.named_modules()}
    converted_modules = {
        n: nn.GroupNorm if type(m) is ConvertedGroupNorm else type(m)
        for n, m in converted.named_modules()
    }
    assert converted_modules == native_modules
    assert _norm_signature(converted) == _norm_signature(native)
    # R-50 53 (stem, 16 blocks x 3, 4 shortcuts), FPN 8, 4conv box head 4, mask head 4.
    assert len(_norm_signature(native)) == 69


def test_converted_syncbn_model_has_the_state_dict_of_the_native_gn_model(native_and_converted):
    native, converted = native_and_converted
    native_shapes = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    converted_shapes = {k: tuple(v.shape) for k, v in converted.state_dict().items()}
    assert converted_shapes == native_shapes
    assert {n: p.requires_grad for n, p in converted.named_parameters()} == {
        n: p.requires_grad for n, p in native.named_parameters()
    }


def test_same_weights_give_the_same_outputs(native_and_converted):
    native, converted = native_and_converted
    # The native model's weights, with every GN affine made non-trivial.
    with torch.no_grad():
        for m in native.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    converted.load_state_dict(native.state_dict(), strict=True)
    native.eval(), converted.eval()
    image = torch.rand(3, 96, 128) * 255
    with torch.no_grad():
        features_native = native.backbone(native.preprocess_image([{"image": image}]).tensor)
        features_converted = converted.backbone(
            converted.preprocess_image([{"image": image}]).tensor
        )
        for key in features_native:
            torch.testing.assert_close(
                features_converted[key], features_native[key], rtol=0, atol=0
            )
        out_native = native([{"image": image}])[0]["instances"]
        out_converted = converted([{"image": image}])[0]["instances"]
    assert len(out_native) == len(out_converted)
    torch.testing.assert_close(out_converted.pred_boxes.tensor, out_native.pred_boxes.tensor)
    torch.testing.assert_close(out_converted.pred_masks, out_native.pred_masks)


def test_detection_checkpointer_loads_bn_weights_into_the_converted_model(tmp_path):
    bn_model = randomize_norm_state(
        _build("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml", **{"MODEL.RESNETS.STRIDE_IN_1X1": "False"})
    )
    DetectionCheckpointer(bn_model, save_dir=str(tmp_path)).save("bn_model")
    bn_layer = bn_model.backbone.bottom_up.res4[0].conv1.norm
    bn_state = {
        k: v.clone() for k, v in bn_layer.state_dict().items() if k != "num_batches_tracked"
    }

    gn_model = convert_norm(
        _build("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml", **{"MODEL.RESNETS.STRIDE_IN_1X1": "False"})
    )
    checkpointer = DetectionCheckpointer(gn_model)
    incompatible = gn_model.load_state_dict(
        torch.load(tmp_path / "bn_model.pth", weights_only=True)["model"], strict=True
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    checkpointer.load(str(tmp_path / "bn_model.pth"))  # detectron2's own loader, the same way
    gn_layer = gn_model.backbone.bottom_up.res4[0].conv1.norm
    ref_w, ref_b = stats_transfer_reference(*bn_state.values(), num_groups=32, eps=1e-5)
    torch.testing.assert_close(gn_layer.weight.double(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn_layer.bias.double(), ref_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", {}),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml", {}),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_1x.yaml", {"MODEL.RESNETS.NORM": "BN"}),
        ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", {"MODEL.RETINANET.NORM": "BN"}),
    ],
)
def test_every_bn_family_layer_of_detectron2_models_converts(config, overrides):
    model = randomize_norm_state(_build(config, **overrides))
    before = sum(NORM_SOURCES.lookup(m) is not None for m in model.modules())
    model = convert_norm(model).eval()
    assert before > 50
    assert not [n for n, m in model.named_modules() if NORM_SOURCES.lookup(m) is not None]
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == before
    with torch.no_grad():
        (result,) = model([{"image": torch.rand(3, 64, 96) * 255}])
    assert "instances" in result
