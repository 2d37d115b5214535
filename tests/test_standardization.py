"""gn_det.standardization: Weight Standardization before GroupNorm, against references written
from the formula (Qiao et al. 2019): ``Ŵ_c = (W_c − mean(W_c)) / sqrt(var(W_c) + eps)`` over each
output channel's fan-in, biased variance."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2 import model_zoo
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from torch import nn

import gn_det
from gn_det import WSConv2d, convert_norm, standardize_weight, standardize_weights
from gn_det.cli import main
from gn_det.cli.config_files import load_config, resolve_config_name
from gn_det.config import ConfigError
from gn_det.folding import fold_for_inference
from gn_det.recompute import RecomputeWSConv2d, enable_recompute
from gn_det.standardization import WS_EPS, unstandardize_weights
from models import randomize_norm_state, resnet18_fpn_backbone, shapes_bn_mask_rcnn


def ws_reference(weight: torch.Tensor, eps: float = WS_EPS) -> np.ndarray:
    """The formula, channel by channel, in numpy float64."""
    w = weight.detach().double().numpy()
    out = np.empty_like(w)
    for c in range(w.shape[0]):
        mean, var = w[c].mean(), ((w[c] - w[c].mean()) ** 2).mean()
        out[c] = (w[c] - mean) / np.sqrt(var + eps)
    return out


def _random_weight(shape=(16, 8, 3, 3), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # A non-zero mean per channel, as trained weights have: WS removes it.
    return (torch.randn(shape, generator=g) * 0.05 + torch.randn(shape[0], 1, 1, 1, generator=g)
            * 0.02).to(dtype)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_standardized_weight_is_the_formula(requires_grad):
    weight = _random_weight().requires_grad_(requires_grad)
    np.testing.assert_allclose(standardize_weight(weight).detach().double().numpy(),
                               ws_reference(weight), rtol=1e-5, atol=1e-5)


def test_the_hand_written_backward_is_the_formulas_gradient():
    weight = _random_weight(dtype=torch.float64).requires_grad_()
    upstream = torch.randn(weight.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((standardize_weight(weight) * upstream).sum(), weight)
    # Autograd through the formula written out: mean, biased variance, division.
    w = weight.detach().clone().requires_grad_()
    flat = w.reshape(w.shape[0], -1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    reference = centred / ((centred**2).mean(dim=1, keepdim=True) + WS_EPS).sqrt()
    (expected,) = torch.autograd.grad((reference.view_as(w) * upstream).sum(), w)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(standardize_weight, (weight[:4, :2],))


def _ws_conv(seed=0):
    torch.manual_seed(seed)
    conv = Conv2d(8, 16, 3, padding=1, bias=False, norm=nn.GroupNorm(4, 16), activation=F.relu)
    with torch.no_grad():
        conv.weight.copy_(_random_weight(seed=seed))
    conv.__class__ = WSConv2d
    return conv


@pytest.mark.parametrize("training", [True, False])
def test_ws_conv_convolves_with_the_standardized_weight(training):
    conv = _ws_conv().train(training)
    x = torch.randn(2, 8, 10, 10)
    weight = torch.from_numpy(ws_reference(conv.weight)).float()
    expected = F.relu(F.group_norm(F.conv2d(x, weight, padding=1), 4, conv.norm.weight,
                                   conv.norm.bias))
    with torch.set_grad_enabled(training):
        torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)


def test_the_inference_weight_is_cached_until_the_weight_changes():
    conv = _ws_conv().eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        first = conv(x)
        cached = conv.standardized_weight()
        assert conv.standardized_weight() is cached  # computed once
        conv.weight.mul_(2).add_(0.01)  # what an optimizer step or a load does: in place
        assert conv.standardized_weight() is not cached
        weight = torch.from_numpy(ws_reference(conv.weight)).float()
        torch.testing.assert_close(conv.standardized_weight(), weight, rtol=1e-4, atol=1e-5)
        assert not torch.equal(conv(x), first)


def _mixed_net():
    """A detectron2 conv + BN; a conv with no norm; a conv + BN under ``skip``; a torchvision-
    style conv and BN side by side (no detectron2 Conv2d holds the BN)."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("a", Conv2d(3, 32, 3, padding=1, bias=False, norm=nn.BatchNorm2d(32)))
    net.add_module("plain", Conv2d(32, 32, 1))
    net.add_module("skip", Conv2d(32, 32, 3, padding=1, bias=False, norm=nn.BatchNorm2d(32)))
    net.add_module("tv_conv", nn.Conv2d(32, 32, 3, padding=1, bias=False))
    net.add_module("tv_bn", nn.BatchNorm2d(32))
    return randomize_norm_state(net).eval()


def test_only_convs_before_a_converted_group_norm_standardize(caplog):
    with caplog.at_level("WARNING", logger="gn_det.standardization"):
        net = convert_norm(_mixed_net(), exclude="skip", weight_standardization=True)
    assert "1 GroupNorm layers are not the norm of a detectron2 Conv2d (first: 'tv_bn')" in \
        caplog.text
    assert type(net.a) is WSConv2d and isinstance(net.a.norm, nn.GroupNorm)
    assert type(net.plain) is Conv2d  # no norm after it: its output scale is its own
    assert type(net.skip) is Conv2d and isinstance(net.skip.norm, nn.BatchNorm2d)
    assert type(net.tv_conv) is nn.Conv2d and isinstance(net.tv_bn, nn.GroupNorm)
    before = copy.deepcopy(net)
    convert_norm(net, exclude="skip", weight_standardization=True)  # twice: nothing changes
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before(x), rtol=0, atol=0)


def test_weight_standardization_needs_a_group_norm_target():
    with pytest.raises(ValueError, match="weight standardization goes with target 'GN'"):
        gn_det.NormSpec(target="FrozenBN", weight_standardization=True)
    cfg = gn_det.get_cfg()
    cfg.merge_from_list(["MODEL.NORM_CONVERSION.ENABLED", "True", "MODEL.NORM_CONVERSION.TARGET",
                         "FrozenBN", "MODEL.NORM_CONVERSION.WEIGHT_STANDARDIZATION", "True"])
    with pytest.raises(ConfigError, match="NORM_CONVERSION: weight standardization goes with"):
        gn_det.norm_spec_from_config(cfg)


def _conv_bn_at_its_population(weight):
    """conv + BN whose population statistics are those of one image's conv output: GN's group
    statistics of that image then equal the ones a transfer derives from BN's."""
    conv = Conv2d(32, 64, 3, padding=1, bias=False, norm=nn.BatchNorm2d(64))
    x = torch.randn(1, 32, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv.weight.copy_(weight)
        z = F.conv2d(x, weight, padding=1)
        conv.norm.running_mean.copy_(z.mean((0, 2, 3)))
        conv.norm.running_var.copy_(z.var((0, 2, 3), unbiased=False))
        conv.norm.weight.uniform_(0.5, 1.5)
        conv.norm.bias.normal_()
    return nn.Sequential(conv).eval(), x


def test_bn_transfer_into_ws_is_exact_where_the_weight_mean_is_zero():
    # WS divides channel c by s_c (absorbed: the statistics are rescaled) and removes
    # m_c · (the local sum of the input), which no per-channel affine absorbs: with m_c = 0 the
    # transfer is exact, as BN -> GN is.
    weight = _random_weight((64, 32, 3, 3))
    weight -= weight.mean(dim=(1, 2, 3), keepdim=True)
    bn, x = _conv_bn_at_its_population(weight)
    ws = convert_norm(copy.deepcopy(bn), weight_standardization=True)
    with torch.no_grad():
        torch.testing.assert_close(ws(x), bn(x), rtol=1e-4, atol=1e-4)


def test_bn_state_loaded_into_a_ws_model_is_the_in_memory_conversion():
    bn = randomize_norm_state(resnet18_fpn_backbone(freeze_at=2)).eval()
    converted = convert_norm(copy.deepcopy(bn), weight_standardization=True)
    loaded = convert_norm(resnet18_fpn_backbone(freeze_at=2, seed=5),
                          weight_standardization=True).eval()
    result = loaded.load_state_dict(bn.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(k.endswith("num_batches_tracked") for k in result.unexpected_keys)
    # A GN+WS state has GN's keys, and its weights are the raw ones (W, not Ŵ).
    plain_gn = convert_norm(copy.deepcopy(bn))
    assert loaded.state_dict().keys() == plain_gn.state_dict().keys()
    torch.testing.assert_close(loaded.state_dict()["bottom_up.res3.0.conv1.weight"],
                               bn.state_dict()["bottom_up.res3.0.conv1.weight"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for name, feature in converted(x).items():
            torch.testing.assert_close(loaded(x)[name], feature, rtol=1e-5, atol=1e-5)


def test_recompute_keeps_weight_standardization_and_its_gradients():
    model = convert_norm(resnet18_fpn_backbone(freeze_at=0), weight_standardization=True).train()
    recomputing = copy.deepcopy(model)
    assert enable_recompute(recomputing) == standardize_weights(model)
    assert all(type(m) is RecomputeWSConv2d for m in recomputing.modules()
               if isinstance(m, WSConv2d))
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (model, recomputing):
        sum(f.square().mean() for f in m(x).values()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_unstandardized_and_folded_models_compute_what_the_ws_model_computes():
    model = convert_norm(resnet18_fpn_backbone(freeze_at=0), weight_standardization=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        plain = copy.deepcopy(model)
        assert unstandardize_weights(plain) == 28  # stem, 16 + 3 shortcuts; FPN: 8
        assert not any(isinstance(m, WSConv2d) for m in plain.modules())
        for name, feature in plain(x).items():
            torch.testing.assert_close(feature, expected[name], rtol=1e-4, atol=1e-4)
        folded, _ = fold_for_inference(model, None)
        reference, _ = fold_for_inference(plain, None)
        for name, feature in folded(x).items():
            torch.testing.assert_close(feature, reference(x)[name], rtol=1e-4, atol=1e-4)


def test_the_key_standardizes_detectron2s_native_gn_model_too():
    cfg = gn_det.get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.NORM_CONVERSION.WEIGHT_STANDARDIZATION",
                         "True"])
    model = gn_det.build_model(cfg)  # routes to NormConverted on the key alone
    convs = [m for m in model.modules() if isinstance(m, Conv2d) and m.norm is not None]
    assert len(convs) == 69 and all(type(m) is WSConv2d for m in convs)


def test_configs_and_lazy_configs_build_gn_ws():
    cfg = load_config(resolve_config_name("shapes/gn_ws.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == len(norms) == 32
    from gn_det.lazy import build_converted_model, with_norm_conversion

    with pytest.raises(ValueError, match="weight standardization goes with target 'GN'"):
        with_norm_conversion({}, target="FrozenBN", weight_standardization=True)
    lazy = build_converted_model(resnet18_fpn_backbone(freeze_at=0), weight_standardization=True)
    assert sum(isinstance(m, WSConv2d) for m in lazy.modules()) == 28  # 20 backbone + 8 FPN


def test_cli_converts_a_bn_checkpoint_to_gn_ws(tmp_path, capsys):
    bn, _ = shapes_bn_mask_rcnn()
    torch.save({"model": bn.state_dict()}, tmp_path / "bn.pth")
    out = tmp_path / "gn_ws.pth"
    assert main(["convert", "--weights", str(tmp_path / "bn.pth"), "--output", str(out),
                 "--config-file", "shapes/bn.yaml", "--to", "GN", "--weight-standardization",
                 "MODEL.DEVICE", "cpu"]) == 0
    cfg = load_config(resolve_config_name("shapes/gn_ws.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    target = build_model(cfg).eval()
    target.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    expected = convert_norm(copy.deepcopy(bn), weight_standardization=True)
    x = torch.rand(1, 3, 96, 128) * 255
    with torch.no_grad():
        for name, feature in expected.backbone(x).items():
            torch.testing.assert_close(target.backbone(x)[name], feature, rtol=1e-5, atol=1e-5)


def test_a_native_gn_target_config_with_the_ws_key_decides_ws(tmp_path, capsys):
    """--target-config naming detectron2's own GN (ENABLED False) with WEIGHT_STANDARDIZATION
    True: the conversion targets GN + WS (transfer, verification, metadata, no pkl)."""
    from gn_det.checkpoint.io import load_checkpoint_file
    from gn_det.standardization import WS_KEY

    bn, _ = shapes_bn_mask_rcnn()
    torch.save({"model": bn.state_dict()}, tmp_path / "bn.pth")
    norms = "".join(f"  {key}:\n    NORM: GN\n" for key in
                    ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"))
    base = resolve_config_name("shapes/Base-shapes.yaml")
    target = tmp_path / "native_gn_ws.yaml"
    target.write_text(f"_BASE_: {base}\nMODEL:\n{norms}"
                      "  NORM_CONVERSION:\n    WEIGHT_STANDARDIZATION: True\n")
    args = ["convert", "--weights", str(tmp_path / "bn.pth"), "--config-file", "shapes/bn.yaml",
            "--target-config", str(target)]
    cpu = ["MODEL.DEVICE", "cpu"]  # the source config's options, last
    assert main([*args, "--output", str(tmp_path / "out.pkl"), *cpu]) == 2
    assert "GN + Weight Standardization checkpoint is written as pth" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "out.pth"), *cpu]) == 0
    written = load_checkpoint_file(str(tmp_path / "out.pth"))
    assert WS_KEY in written
    expected = convert_norm(copy.deepcopy(bn), weight_standardization=True)
    cfg = load_config(str(target))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    model.load_state_dict(written["model"], strict=True)
    x = torch.rand(1, 3, 96, 128) * 255
    with torch.no_grad():
        for name, feature in expected.backbone(x).items():
            torch.testing.assert_close(model.backbone(x)[name], feature, rtol=1e-5, atol=1e-5)
    target.write_text(target.read_text().replace("True", "False"))
    assert main([*args, "--weight-standardization", "--output", str(tmp_path / "x.pth"), *cpu]) == 2
    assert "WEIGHT_STANDARDIZATION is False" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_cli_inspect_shows_which_convs_standardize(capsys):
    assert main(["inspect", "--config-file", "shapes/bn.yaml", "--to", "GN",
                 "--weight-standardization", "MODEL.DEVICE", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "conv WS" in out
    row = next(line for line in out.splitlines() if line.startswith("backbone.bottom_up.stem"))
    assert row.split()[-1] == "True"
    assert main(["inspect", "--config-file", "shapes/bn.yaml", "--weight-standardization"]) == 2
    assert "--weight-standardization goes with --to GN" in capsys.readouterr().err


@pytest.mark.parametrize("file_format", ["pth", "safetensors"])
def test_a_gn_ws_checkpoint_refuses_a_model_without_ws(tmp_path, file_format):
    from gn_det.checkpoint import Checkpointer
    from gn_det.checkpoint.io import CheckpointError, save_checkpoint_file
    from gn_det.standardization import ws_metadata

    def build(name):
        cfg = load_config(resolve_config_name(name))
        cfg.MODEL.DEVICE = "cpu"
        torch.manual_seed(0)
        return build_model(cfg)

    ws_model = build("shapes/gn_ws.yaml")
    path = tmp_path / f"gn_ws.{file_format}"
    save_checkpoint_file({"model": ws_model.state_dict(), **ws_metadata(ws_model)}, path,
                         file_format=file_format)
    with pytest.raises(CheckpointError, match="WEIGHT_STANDARDIZATION True"):
        Checkpointer(build("shapes/gn.yaml")).load_weights(str(path))
    incompatible = Checkpointer(build("shapes/gn_ws.yaml")).load_weights(str(path))
    assert not incompatible.missing_keys
    # detectron2's training checkpoints say so too.
    Checkpointer(ws_model, save_dir=str(tmp_path)).save("model_final")
    with pytest.raises(CheckpointError, match="built without it"):
        Checkpointer(build("shapes/gn.yaml")).load_weights(str(tmp_path / "model_final.pth"))


def test_bn_transfer_into_ws_keeps_a_conv_bias_exact():
    # WS scales W·x but not the bias: the BN statistics become a·μ + c with a = 1/s, c = b(1 − a).
    weight = _random_weight((64, 32, 3, 3))
    weight -= weight.mean(dim=(1, 2, 3), keepdim=True)
    conv = Conv2d(32, 64, 3, padding=1, bias=True, norm=nn.BatchNorm2d(64))
    x = torch.randn(1, 32, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.normal_()
        z = F.conv2d(x, weight, conv.bias, padding=1)
        conv.norm.running_mean.copy_(z.mean((0, 2, 3)))
        conv.norm.running_var.copy_(z.var((0, 2, 3), unbiased=False))
    bn = nn.Sequential(conv).eval()
    ws = convert_norm(copy.deepcopy(bn), weight_standardization=True)
    loaded = convert_norm(copy.deepcopy(bn), weight_standardization=True)
    loaded.load_state_dict(bn.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ws(x), bn(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x), bn(x), rtol=1e-4, atol=1e-4)


def test_the_cache_follows_inference_mode_moves_and_mode_switches():
    conv = _ws_conv().eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.inference_mode():
        inferred = conv(x)
    # The weight cached in inference mode serves a frozen conv whose input needs a gradient.
    conv.weight.requires_grad_(False)
    out = conv(x.requires_grad_())
    out.sum().backward()
    torch.testing.assert_close(out.detach(), inferred)
    with torch.no_grad():
        conv.weight.data.mul_(3)  # no version bump: seen after a switch of mode
        conv.train().eval()
        expected = torch.from_numpy(ws_reference(conv.weight)).float()
        torch.testing.assert_close(conv.standardized_weight(), expected, rtol=1e-4, atol=1e-5)
        conv.double()
        assert conv.standardized_weight().dtype == torch.float64
    with torch.inference_mode():  # a model built in inference mode: nothing cached, still right
        built = _ws_conv().eval()
        torch.testing.assert_close(built(x.detach()), _ws_conv().eval()(x.detach()))


def test_second_derivatives_are_refused_not_wrong():
    weight = _random_weight(dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(standardize_weight(weight).pow(3).sum(), weight,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad.sum().backward()


def test_cli_refuses_pkl_for_gn_ws_and_folding_a_gn_ws_checkpoint_without_ws(tmp_path, capsys):
    from gn_det.standardization import ws_metadata

    bn, _ = shapes_bn_mask_rcnn()
    torch.save({"model": bn.state_dict()}, tmp_path / "bn.pth")
    assert main(["convert", "--weights", str(tmp_path / "bn.pth"), "--config-file",
                 "shapes/bn.yaml", "--to", "GN", "--weight-standardization", "--output",
                 str(tmp_path / "out.pkl"), "MODEL.DEVICE", "cpu"]) == 2  # pkl: no metadata
    assert "written as pth or safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out.pkl").exists()
    cfg = load_config(resolve_config_name("shapes/gn_ws.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    ws_model = build_model(cfg)
    torch.save({"model": ws_model.state_dict(), **ws_metadata(ws_model)}, tmp_path / "ws.pth")
    assert main(["convert", "--to", "folded", "--weights", str(tmp_path / "ws.pth"), "--output",
                 str(tmp_path / "folded.pth"), "--config-file", "shapes/gn.yaml",
                 "MODEL.DEVICE", "cpu"]) == 2
    assert "WEIGHT_STANDARDIZATION True" in capsys.readouterr().err


def test_evaluations_between_fused_adamw_steps_see_the_new_weights():
    # torch's fused AdamW updates weights in place without a version bump: an evaluation in the
    # training loop (eval(), forward, train()) must still standardise the current weight.
    conv = _ws_conv()
    optimizer = torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, 8, 6, 6)
    for _ in range(3):
        conv.train()
        conv(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        conv.eval()
        with torch.no_grad():
            expected = torch.from_numpy(ws_reference(conv.weight)).float()
            torch.testing.assert_close(conv.standardized_weight(), expected, rtol=1e-4,
                                       atol=1e-5)
