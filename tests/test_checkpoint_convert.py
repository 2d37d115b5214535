"""gn-det convert: every input format to a GN checkpoint that the GN configs load strictly,
and every way it must fail cleanly."""

import hashlib
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from safetensors.torch import save_file

import gn_det
from gn_det.checkpoint import Checkpointer
from gn_det.cli import main
from gn_det.cli.config_files import load_config, resolve_config_name
from reference import stats_transfer_reference
from models import randomize_norm_state

BN_CONFIG = "mask_rcnn_R_50_FPN_bn.yaml"
GN_CONFIG = "gn_mask_rcnn.yaml"
LAYER = "backbone.bottom_up.res4.2.conv2"  # a trainable BN layer of the source model


def _model(name, **overrides):
    cfg = load_config(resolve_config_name(name))
    cfg.MODEL.DEVICE = "cpu"
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.fixture(scope="module")
def bn_model():
    """The BN model with non-trivial BN statistics, as a trained one has."""
    model = _model(BN_CONFIG)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if gn_det.NORM_SOURCES.lookup(m) is not None:
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _bn_state(model, layer):
    norm = model.get_submodule(layer).norm
    return norm.weight.detach(), norm.bias.detach(), norm.running_mean, norm.running_var


def _convert(*argv):
    return main(["convert", *map(str, argv)])


def _gn_model_strictly_loaded(state):
    gn_model = _model(GN_CONFIG)
    gn_model.load_state_dict(state, strict=True)
    return gn_model


def _assert_stats_transfer(gn_model, bn_model, layer=LAYER):
    expected_w, expected_b = stats_transfer_reference(
        *_bn_state(bn_model, layer), num_groups=32, eps=1e-5
    )
    gn = gn_model.get_submodule(layer).norm
    torch.testing.assert_close(gn.weight.detach().double(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn.bias.detach().double(), expected_b, rtol=1e-5, atol=1e-6)


def test_detectron2_pth_to_gn(bn_model, tmp_path, capsys):
    source = tmp_path / "bn_model.pth"
    torch.save({"model": bn_model.state_dict(), "iteration": 100}, source)
    out = tmp_path / "gn_model.pth"
    assert _convert("--weights", source, "--output", out, "--config-file", BN_CONFIG) == 0
    printed = capsys.readouterr().out
    assert "detector checkpoint" in printed and "transfer: stats" in printed
    assert re.search(r"keys matched: (\d+)/\1", printed)  # every expected key matched
    assert re.search(r"BatchNorm2d\s+ConvertedGroupNorm\s+58", printed)
    assert re.search(r"FrozenBatchNorm2d\s+ConvertedGroupNorm\s+11", printed)
    state = torch.load(out, weights_only=True)["model"]
    _assert_stats_transfer(_gn_model_strictly_loaded(state), bn_model)


def test_model_zoo_pkl_to_gn(bn_model, tmp_path):
    source = tmp_path / "model_final.pkl"
    with open(source, "wb") as f:  # detectron2 model-zoo format: numpy arrays
        pickle.dump(
            {
                "model": {k: v.numpy() for k, v in bn_model.state_dict().items()},
                "__author__": "tests",
            },
            f,
        )
    out = tmp_path / "gn_model.pkl"
    assert _convert("--weights", source, "--output", out, "--config-file", BN_CONFIG) == 0
    with open(out, "rb") as f:
        saved = pickle.load(f)  # plain pickle: gn_det's output holds numpy arrays only
    assert saved["__author__"] == "gn_det"
    gn_model = _gn_model_strictly_loaded(
        {k: torch.from_numpy(v) for k, v in saved["model"].items()}
    )
    _assert_stats_transfer(gn_model, bn_model)


def test_safetensors_to_gn(bn_model, tmp_path):
    source = tmp_path / "bn_model.safetensors"
    save_file({k: v.contiguous() for k, v in bn_model.state_dict().items()}, str(source))
    out = tmp_path / "gn_model.safetensors"
    assert (
        _convert(
            "--weights", source, "--output", out, "--config-file", BN_CONFIG, "--transfer", "copy"
        )
        == 0
    )
    from safetensors.torch import load_file

    gn_model = _gn_model_strictly_loaded(load_file(str(out)))
    norm = bn_model.get_submodule(LAYER).norm
    assert torch.equal(gn_model.get_submodule(LAYER).norm.weight, norm.weight)  # copy transfer


def _caffe2_backbone(bn_model):
    """The BN model's ResNet as a Detectron/Caffe2 ImageNet .pkl: Caffe2 names, BN fused."""
    blobs = {}
    bottom_up = bn_model.backbone.bottom_up
    for name, module in bottom_up.named_modules():
        if not hasattr(module, "norm") or module.norm is None:
            continue
        c2 = name.replace("stem.conv1", "conv1")
        c2 = re.sub(r"^res(\d)\.(\d+)\.", r"res\1_\2_", c2)
        c2 = c2.replace("shortcut", "branch1").replace(
            "conv1", "branch2a" if c2.startswith("res") else "conv1"
        )
        c2 = c2.replace("conv2", "branch2b").replace("conv3", "branch2c")
        norm = module.norm
        scale = norm.weight / (norm.running_var + norm.eps).sqrt()
        blobs[c2 + "_w"] = module.weight.detach().numpy()
        bn_name = "res_conv1" if c2 == "conv1" else c2
        blobs[bn_name + "_bn_s"] = scale.detach().numpy()
        blobs[bn_name + "_bn_b"] = (norm.bias - norm.running_mean * scale).detach().numpy()
    blobs["pred_w"] = np.zeros((1000, 2048), np.float32)
    return blobs


def test_caffe2_pkl_with_fused_bn_to_a_gn_backbone(bn_model, tmp_path):
    source = tmp_path / "R-50.pkl"
    blobs = _caffe2_backbone(bn_model)
    with open(source, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    out = tmp_path / "R-50-GN.pkl"
    assert _convert("--weights", source, "--output", out, "--config-file", BN_CONFIG) == 0
    gn_model = _model(GN_CONFIG)
    incompatible = Checkpointer(gn_model).load_weights(str(out))  # as train_net loads MODEL.WEIGHTS
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    assert not incompatible.unexpected_keys
    # Fused BN is affine only (mean 0, std 1): stats == copy, the fused scale and shift carry over.
    norm = gn_model.backbone.bottom_up.res4[2].conv2.norm
    torch.testing.assert_close(
        norm.weight.detach().numpy(), blobs["res4_2_branch2b_bn_s"], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        norm.bias.detach().numpy(), blobs["res4_2_branch2b_bn_b"], rtol=1e-5, atol=1e-5
    )


def test_torchvision_resnet50_to_a_gn_backbone(tmp_path):
    resnet = torchvision.models.resnet50()
    bn = randomize_norm_state(resnet.layer3[2].bn2)
    source = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet.state_dict(), source)
    out = tmp_path / "R-50-GN.pth"
    assert _convert("--weights", source, "--output", out) == 0  # default source: the BN R-50 config
    saved = torch.load(out, weights_only=True)
    assert saved["matching_heuristics"] is True and "res4.2.conv2.norm.weight" in saved["model"]
    gn_model = _model(GN_CONFIG)
    incompatible = Checkpointer(gn_model).load_weights(str(out))
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    expected_w, expected_b = stats_transfer_reference(
        bn.weight.detach(),
        bn.bias.detach(),
        bn.running_mean,
        bn.running_var,
        num_groups=32,
        eps=1e-5,
    )
    norm = gn_model.backbone.bottom_up.res4[2].conv2.norm
    torch.testing.assert_close(norm.weight.detach().double(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.bias.detach().double(), expected_b, rtol=1e-5, atol=1e-6)


def test_training_loader_transfers_bn_statistics_of_imagenet_weights(tmp_path):
    """MODEL.WEIGHTS = a BN ImageNet checkpoint (names matched by heuristics), GN model: the
    statistics reach the GN layers instead of being dropped by detectron2's name matching."""
    resnet = torchvision.models.resnet50()
    randomize_norm_state(resnet.layer2[0].bn1)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    gn_model = _model(GN_CONFIG)
    Checkpointer(gn_model).load_weights(str(tmp_path / "resnet50.pth"))
    bn = resnet.layer2[0].bn1
    expected_w, _ = stats_transfer_reference(
        bn.weight.detach(),
        bn.bias.detach(),
        bn.running_mean,
        bn.running_var,
        num_groups=32,
        eps=1e-5,
    )
    got = gn_model.backbone.bottom_up.res3[0].conv1.norm.weight.detach().double()
    torch.testing.assert_close(got, expected_w, rtol=1e-5, atol=1e-6)


def test_inspect_weights_lists_the_norm_layers(bn_model, tmp_path, capsys):
    torch.save({"model": bn_model.state_dict()}, tmp_path / "bn.pth")
    assert main(["inspect", "--weights", str(tmp_path / "bn.pth")]) == 0
    out = capsys.readouterr().out
    assert "backbone.bottom_up.res4.2.conv2.norm" in out and re.search(
        r"BN\s+69", out
    )  # FrozenBN keeps statistics too


# ---- bad input: exit 2, one line naming the file, nothing written --------------------------


def _error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_carrying_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    source = tmp_path / "evil.pkl"
    with open(source, "wb") as f:
        pickle.dump({"model": {"w": _WritesAFile(marker)}, "__author__": "x"}, f)
    assert _convert("--weights", source, "--output", tmp_path / "out.pkl") == 2
    err = _error(capsys)
    assert "evil.pkl" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


def test_a_pth_carrying_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    source = tmp_path / "evil.pth"
    torch.save({"model": {"w": _WritesAFile(marker)}}, source)
    assert _convert("--weights", source, "--output", tmp_path / "out.pth") == 2
    assert "evil.pth" in _error(capsys)
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize(
    "content, problem",
    [(b"", "empty"), (b"not a checkpoint at all", "format"), (b"PK\x03\x04truncated", "")],
)
def test_corrupt_or_unknown_files(tmp_path, capsys, content, problem):
    source = tmp_path / "weights.pth"
    source.write_bytes(content)
    assert _convert("--weights", source, "--output", tmp_path / "out.pth") == 2
    err = _error(capsys)
    assert "weights.pth" in err and problem in err.lower()


def test_a_missing_file(tmp_path, capsys):
    assert _convert("--weights", tmp_path / "nope.pth", "--output", tmp_path / "out.pth") == 2
    assert "nope.pth" in _error(capsys)


def test_a_checkpoint_that_does_not_fit_names_the_first_mismatching_layers(
    bn_model, tmp_path, capsys
):
    source = tmp_path / "bn.pth"
    torch.save({"model": bn_model.state_dict()}, source)
    out = tmp_path / "out.pth"
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            out,
            "--config-file",
            BN_CONFIG,
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "4",
        )
        == 2
    )
    err = _error(capsys)
    assert "does not fit" in err and "roi_heads.box_predictor.cls_score.weight" in err
    assert not out.exists()


def test_existing_output_needs_force_and_conflicting_flags_fail(bn_model, tmp_path, capsys):
    source = tmp_path / "bn.pth"
    torch.save({"model": bn_model.state_dict()}, source)
    out = tmp_path / "out.pth"
    out.write_bytes(b"keep me")
    assert _convert("--weights", source, "--output", out, "--config-file", BN_CONFIG) == 2
    assert "--force" in _error(capsys) and out.read_bytes() == b"keep me"
    assert _convert("--weights", source, "--output", tmp_path / "o.pkl", "--format", "pth") == 2
    assert "conflicts" in _error(capsys)
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            tmp_path / "o.pth",
            "--target-config",
            GN_CONFIG,
            "--num-groups",
            "16",
        )
        == 2
    )
    assert "conflict" in _error(capsys)
    assert (
        _convert("--weights", source, "--output", out, "--config-file", BN_CONFIG, "--force") == 0
    )
    assert out.read_bytes() != b"keep me"


def test_an_interrupted_write_leaves_no_output_and_the_input_untouched(
    bn_model, tmp_path, monkeypatch, capsys
):
    source = tmp_path / "bn.pth"
    torch.save({"model": bn_model.state_dict()}, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    import gn_det.checkpoint.io as checkpoint_io

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_io.torch, "save", failing_save)
    out = tmp_path / "out.pth"
    assert _convert("--weights", source, "--output", out, "--config-file", BN_CONFIG) != 0
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.pth"]
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest


def test_convert_with_calibration(tmp_path, capsys):
    from gn_det.data import register_shapes

    register_shapes(
        "shapes_calib", cache_dir=tmp_path / "cache", image_size=(96, 96), num_train=3, num_val=1
    )
    bn_model = _model("shapes/bn.yaml")
    source = tmp_path / "bn.pth"
    torch.save({"model": bn_model.state_dict()}, source)
    out = tmp_path / "gn.pth"
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            out,
            "--config-file",
            "shapes/bn.yaml",
            "--transfer",
            "calibrate",
            "--calib-dataset",
            "shapes_calib_train",
            "--calib-images",
            "3",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "transfer: stats + calibrate" in printed
    before, after = map(float, re.search(r"error per layer ([\d.]+) -> ([\d.]+)", printed).groups())
    assert after < before
    gn_model = _model("shapes/gn.yaml")
    gn_model.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    assert _convert("--weights", source, "--output", tmp_path / "x.pth", "--calib-images", "3") == 2
    assert "go with --transfer calibrate or distill" in _error(capsys)

    distilled = tmp_path / "gn_distilled.pth"
    calibrate = [
        "--config-file",
        "shapes/bn.yaml",
        "--transfer",
        "calibrate",
        "--calib-dataset",
        "shapes_calib_train",
        "--calib-images",
        "3",
    ]
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            distilled,
            *calibrate,
            "--calib-distill-steps",
            "2",
            "--calib-distill-heads",
            "norms",
        )
        == 0
    )
    assert "transfer: stats + calibrate + distill 2 steps (GN affine)" in capsys.readouterr().out
    calibrated, distilled = (torch.load(p, weights_only=True)["model"] for p in (out, distilled))
    changed = {k for k in calibrated if not torch.equal(calibrated[k], distilled[k])}
    assert changed and all("norm" in k for k in changed)
    assert (
        _convert("--weights", source, "--output", tmp_path / "x.pth", "--calib-distill-steps", "2")
        == 2
    )
    assert "go with --transfer calibrate or distill" in _error(capsys)
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            *calibrate,
            "--calib-distill-steps",
            "-1",
        )
        == 2
    )
    assert "must be 0 or more" in _error(capsys)
    assert not (tmp_path / "x.pth").exists()


def test_convert_with_distillation_from_stats(tmp_path, capsys):
    """--transfer distill: stats, then distillation only (no least squares); default 100 steps."""
    from gn_det.data import register_shapes

    register_shapes(
        "shapes_distil", cache_dir=tmp_path / "cache", image_size=(96, 96), num_train=2, num_val=1
    )
    bn_model = _model("shapes/bn.yaml")
    source = tmp_path / "bn.pth"
    torch.save({"model": bn_model.state_dict()}, source)
    stats, distilled = tmp_path / "stats.pth", tmp_path / "distilled.pth"
    assert _convert("--weights", source, "--output", stats, "--config-file", "shapes/bn.yaml") == 0
    distill = [
        "--config-file",
        "shapes/bn.yaml",
        "--transfer",
        "distill",
        "--calib-dataset",
        "shapes_distil_train",
        "--calib-images",
        "2",
    ]
    capsys.readouterr()
    assert (
        _convert("--weights", source, "--output", distilled, *distill, "--calib-distill-steps", "2")
        == 0
    )
    printed = capsys.readouterr().out
    assert "transfer: stats + distill 2 steps (GN affine, ROI-head weights)" in printed
    assert "calibration:" not in printed
    norms_only = tmp_path / "norms_only.pth"
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            norms_only,
            *distill,
            "--calib-distill-steps",
            "2",
            "--calib-distill-heads",
            "norms",
        )
        == 0
    )
    assert "transfer: stats + distill 2 steps (GN affine)" in capsys.readouterr().out
    stats, distilled, norms_only = (
        torch.load(p, weights_only=True)["model"] for p in (stats, distilled, norms_only)
    )
    changed = {k for k in stats if not torch.equal(stats[k], distilled[k])}
    heads = ("roi_heads.box_head.", "roi_heads.mask_head.")
    assert changed and all("norm" in k for k in changed if not k.startswith(heads))
    assert any(k.startswith(heads) and "norm" not in k for k in changed)
    changed = {k for k in stats if not torch.equal(stats[k], norms_only[k])}
    assert changed and all("norm" in k for k in changed)
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            "--config-file",
            "shapes/bn.yaml",
            "--calib-distill-heads",
            "norms",
        )
        == 2
    )
    assert "go with --transfer calibrate or distill" in _error(capsys)
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            "--config-file",
            "shapes/bn.yaml",
            "--transfer",
            "calibrate",
            "--calib-distill-heads",
            "norms",
        )
        == 2
    )
    assert "--calib-distill-heads goes with distillation" in _error(capsys)

    # A backbone checkpoint's heads were never trained: only the backbone's outputs are distilled.
    backbone = tmp_path / "backbone.pth"
    torch.save(
        {
            "model": {
                k: v
                for k, v in bn_model.state_dict().items()
                if k.startswith("backbone.bottom_up.")
            }
        },
        backbone,
    )
    assert (
        _convert(
            "--weights",
            backbone,
            "--output",
            tmp_path / "backbone_gn.pth",
            *distill,
            "--calib-distill-steps",
            "1",
        )
        == 0
    )
    assert "backbone checkpoint" in (printed := capsys.readouterr().out)
    assert "transfer: stats + distill 1 steps (backbone GN affine)" in printed
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            *distill,
            "--calib-distill-steps",
            "0",
        )
        == 2
    )
    assert "must be 1 or more" in _error(capsys)
    assert not (tmp_path / "x.pth").exists()


def test_calibration_on_a_folder_of_the_users_images_and_no_silent_default(tmp_path, capsys):
    """--calib-images-dir: any folder of JPEG/PNG, no labels. Without a source, a config whose
    training set is not here (COCO) is a one-line error, never synthetic images."""
    from PIL import Image

    folder = tmp_path / "my images"
    (folder / "day2").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(["day1.jpg", "day2/a.png", "day2/b.JPEG"]):
        pixels = (torch.rand(72, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name)
    bn_model = _model("shapes/bn.yaml")
    source = tmp_path / "bn.pth"
    torch.save({"model": bn_model.state_dict()}, source)
    out = tmp_path / "gn.pth"
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            out,
            "--config",
            "shapes/bn.yaml",
            "--transfer",
            "distill",
            "--calib-images-dir",
            folder,
            "--calib-images",
            "2",
            "--calib-distill-steps",
            "1",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "transfer: stats + distill 1 steps" in printed and out.is_file()

    bn_source = tmp_path / "r50_bn.pth"
    torch.save({"model": _model(BN_CONFIG).state_dict()}, bn_source)
    for method in ("calibrate", "distill"):
        assert (
            _convert(
                "--weights",
                bn_source,
                "--output",
                tmp_path / "x.pth",
                "--config",
                BN_CONFIG,
                "--transfer",
                method,
            )
            == 2
        )
        err = _error(capsys)
        assert f"--transfer {method} needs images of the model's own domain" in err
        assert "coco_2017_train" in err and "--calib-images-dir DIR" in err
    assert (
        _convert(
            "--weights",
            bn_source,
            "--output",
            tmp_path / "x.pth",
            "--config",
            BN_CONFIG,
            "--verify-images",
            "2",
        )
        == 2
    )
    err = _error(capsys)
    assert (
        "--verify-images needs images" in err
        and "DATASETS.TEST" in err
        and "--verify-images-dir DIR" in err
    )
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            "--config",
            "shapes/bn.yaml",
            "--transfer",
            "distill",
            "--calib-images-dir",
            folder,
            "--calib-dataset",
            "shapes_train",
        )
        == 2
    )
    assert "give one of them" in _error(capsys)
    assert (
        _convert(
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            "--config",
            "shapes/bn.yaml",
            "--transfer",
            "distill",
            "--calib-images-dir",
            tmp_path / "nowhere",
        )
        == 2
    )
    assert "not a folder of images" in _error(capsys)
    assert not (tmp_path / "x.pth").exists()


def test_a_target_config_that_reads_images_differently_is_refused(tmp_path, capsys):
    """MSRA-convention weights (the model zoo's SyncBN Mask R-CNN: BGR, std 1, stride in the
    1x1) into gn_mask_rcnn.yaml (torchvision's: RGB, std, stride in the 3x3): every tensor fits,
    the model would be wrong. Refused before anything is read."""
    assert (
        _convert(
            "--weights",
            tmp_path / "unread.pkl",
            "--output",
            tmp_path / "o.pth",
            "--config",
            "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
            "--target-config",
            GN_CONFIG,
        )
        == 2
    )
    err = _error(capsys)
    assert "reads images differently" in err and "INPUT.FORMAT BGR -> RGB" in err
    assert (
        "MODEL.RESNETS.STRIDE_IN_1X1 True -> False" in err
        and "MODEL.NORM_CONVERSION.ENABLED True" in err
    )


def test_convert_to_folded_writes_a_verified_inference_checkpoint(tmp_path, capsys, tiny_env):
    """gn-det convert --to folded: the GN model folded for inference, loaded strictly by the
    config with MODEL.NORM_CONVERSION.FOLDED; the same safety as any conversion."""
    import subprocess
    import sys
    from pathlib import Path

    gn = _model("shapes/gn.yaml")
    source = tmp_path / "gn.pth"
    torch.save({"model": gn.state_dict()}, source)
    out = tmp_path / "folded.pth"
    small = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
    from gn_det.data import register_shapes

    register_shapes(
        "shapes_fold", cache_dir=tmp_path / "cache", image_size=(64, 64), num_train=3, num_val=1
    )
    assert (
        _convert(
            "--config",
            "shapes/gn.yaml",
            "--weights",
            source,
            "--output",
            out,
            "--to",
            "folded",
            "--calib-dataset",
            "shapes_fold_train",
            "--calib-images",
            "3",
            "--calib-distill-steps",
            "2",
            "--fold-exclude",
            "roi_heads",
            *small,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "folded for inference" in printed and "statistics: 3 images; distilled 2 steps" in printed
    )
    assert "folded into the conv" in printed and "kept as GN" in printed
    folded = _model(
        "shapes/gn.yaml",
        **{
            "MODEL.NORM_CONVERSION.FOLDED": "True",
            "MODEL.NORM_CONVERSION.FOLDED_EXCLUDE": "['roi_heads']",
        },
    )
    folded.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    assert not [
        n
        for n, m in folded.named_modules()
        if isinstance(m, torch.nn.GroupNorm) and not n.startswith("roi_heads")
    ]

    # Not overwritten without --force; flags that do not apply; no GroupNorm to fold.
    assert (
        _convert(
            "--config",
            "shapes/gn.yaml",
            "--weights",
            source,
            "--output",
            out,
            "--to",
            "folded",
            *small,
        )
        == 2
    )
    assert "--force" in _error(capsys)
    assert (
        _convert(
            "--config",
            "shapes/gn.yaml",
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            "--to",
            "folded",
            "--transfer",
            "distill",
        )
        == 2
    )
    assert "--transfer do not apply to --to folded" in _error(capsys)
    assert (
        _convert(
            "--config",
            "shapes/gn.yaml",
            "--weights",
            source,
            "--output",
            tmp_path / "x.pth",
            "--fold-exclude",
            "roi_heads",
        )
        == 2
    )
    assert "--fold-exclude goes with --to folded" in _error(capsys)
    bn = tmp_path / "bn.pth"
    torch.save({"model": _model("shapes/bn.yaml").state_dict()}, bn)
    assert (
        _convert(
            "--config",
            "shapes/bn.yaml",
            "--weights",
            bn,
            "--output",
            tmp_path / "x.pth",
            "--to",
            "folded",
            "--calib-dataset",
            "shapes_fold_train",
            "--calib-images",
            "1",
            *small,
        )
        == 2
    )
    assert "no GroupNorm layer" in _error(capsys)
    assert not (tmp_path / "x.pth").exists()

    # Without images (the config's training set is not here): data-free, and it says so.
    assert (
        _convert(
            "--config",
            "shapes/gn.yaml",
            "--weights",
            source,
            "--output",
            tmp_path / "free.pth",
            "--to",
            "folded",
            "DATASETS.TRAIN",
            "('coco_2017_train',)",
            *small,
        )
        == 0
    )
    captured = capsys.readouterr()
    assert (
        "data-free statistics" in captured.err
        and "statistics: data-free (mean 0, variance 1)" in captured.out
    )

    # gn-det train evaluates it (--eval-only) as any detectron2 model.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gn_det.cli",
            "train",
            "--config",
            "shapes/gn.yaml",
            "--eval-only",
            "MODEL.NORM_CONVERSION.FOLDED",
            "True",
            "MODEL.NORM_CONVERSION.FOLDED_EXCLUDE",
            "['roi_heads']",
            "MODEL.WEIGHTS",
            str(out),
            "DATASETS.TEST",
            "('shapes_tiny_val',)",
            *small,
            "OUTPUT_DIR",
            str(tmp_path / "eval"),
        ],
        env=tiny_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Evaluation results for bbox" in Path(tmp_path / "eval" / "log.txt").read_text()
