"""Impossible BatchNorm state (non-finite values, a negative variance) is refused where it is
transferred into GroupNorm, naming the layer, in memory and from a checkpoint: nothing
non-finite is written."""

import math

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

import gn_det
from gn_det.checkpoint.errors import CorruptValuesError
from gn_det.cli import main
from gn_det.cli.config_files import load_config, resolve_config_name
from models import randomize_norm_state

CORRUPTIONS = [
    ("running_mean", math.nan),
    ("running_var", -1.0),
    ("running_var", math.inf),
    ("weight", math.nan),
    ("bias", -math.inf),
]


def _bn_net(eps=1e-5):
    net = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 1),
                        nn.BatchNorm2d(64, eps=eps))
    return randomize_norm_state(net)


@pytest.mark.parametrize("name, value", CORRUPTIONS)
def test_convert_norm_refuses_impossible_bn_state_naming_the_layer(name, value):
    net = _bn_net()
    with torch.no_grad():
        getattr(net[4], name)[5] = value
    negative = "negative or " if name == "running_var" else ""
    with pytest.raises(CorruptValuesError,
                       match=rf"^'4': 1 of the 64 values of its {name} are {negative}not finite"):
        gn_det.convert_norm(net)


def test_a_transfer_that_would_divide_by_zero_is_refused():
    net = _bn_net(eps=0.0)
    with torch.no_grad():
        net[4].running_var[0] = 0.0  # finite, possible, but σ = 0 with eps 0
    with pytest.raises(CorruptValuesError, match=r"^'4': 1 of the 64 values of its transferred"):
        gn_det.convert_norm(net)


@pytest.mark.parametrize("name, value", CORRUPTIONS)
def test_loading_impossible_bn_state_into_converted_gn_is_refused(name, value):
    state = _bn_net().state_dict()
    state[f"4.{name}"][5] = value
    gn = gn_det.convert_norm(_bn_net())
    before = gn[4].weight.detach().clone(), gn[4].bias.detach().clone()
    with pytest.raises(CorruptValuesError, match=rf"^'4': 1 of the 64 values of its {name}"):
        gn.load_state_dict(state)
    assert torch.equal(gn[4].weight, before[0]) and torch.equal(gn[4].bias, before[1])


def test_gn_det_convert_refuses_a_checkpoint_with_a_nan_statistic(tmp_path, capsys):
    cfg = load_config(str(resolve_config_name("shapes/bn.yaml")))
    state = build_model(cfg).state_dict()
    state["backbone.bottom_up.res3.0.conv1.norm.running_var"][7] = math.nan
    torch.save({"model": state}, tmp_path / "bn.pth")
    argv = ["convert", "--weights", tmp_path / "bn.pth", "--output", tmp_path / "gn.pth",
            "--config-file", "shapes/bn.yaml"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gn-det convert: error: 'backbone.bottom_up.res3.0.conv1.norm': 1 of "
                          "the 128 values of its running_var are negative or not finite "
                          "(the first: nan)"), err
    assert len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.pth"]
