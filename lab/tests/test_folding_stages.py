"""gn_det_lab.folding: GroupNorm folded stage by stage computes what gn_det's one-call
fold_for_inference computes, and each stage is what it says."""

import copy

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from gn_det.folding import ChannelAffine, fold_for_inference
from gn_det_lab.folding import (affine_stage, fold_affines, fold_frozen_batchnorm, kept_as_gn,
                                layer_counts)
from models import gn_folding_net, randomize_norm_state


def _images():
    g = torch.Generator().manual_seed(1)
    return (
        torch.rand(6, 3, 12, 12, generator=g) * torch.rand(6, 1, 1, 1, generator=g) * 3
    )  # contrasts differ


@pytest.mark.parametrize("steps", [0, 3])
def test_the_stages_in_a_row_are_fold_for_inference(steps):
    net, images = gn_folding_net(), _images()
    torch.manual_seed(0)
    expected, report = fold_for_inference(
        net, images, distill_steps=steps, batch_size=2, progress=False
    )
    torch.manual_seed(0)
    unfolded, outcome = affine_stage(net, images, distill_steps=steps, batch_size=2)
    assert outcome == {
        "0.norm": "affine (not folded)",
        "1.norm": "affine (not folded)",
        "3": "affine (not folded)",
    }
    assert isinstance(unfolded[0].norm, ChannelAffine) and isinstance(unfolded[3], ChannelAffine)
    folded = copy.deepcopy(unfolded)
    assert (
        fold_affines(folded)
        == {name: what for name, _, what in report.rows}
        == {
            "0.norm": "folded into the conv",
            "1.norm": "folded into the conv",
            "3": "affine (no conv before it)",
        }
    )
    assert (
        folded[0].norm is None
        and folded[0].bias is not None
        and isinstance(folded[3], ChannelAffine)
    )
    with torch.no_grad():
        torch.testing.assert_close(folded(images), expected(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            folded(images), unfolded(images), rtol=1e-4, atol=1e-5
        )  # folding is exact
        if steps:  # distillation moved the affines away from the statistics' ones
            start, _ = affine_stage(net, images, distill_steps=0)
            assert not torch.allclose(start[0].norm.weight, unfolded[0].norm.weight)
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())  # the input model is untouched


def test_a_partial_plan_keeps_gn_where_it_says_and_the_counts_say_so():
    net, images = gn_folding_net(), _images()
    unfolded, outcome = affine_stage(net, images, exclude=["1"], distill_steps=0)
    assert outcome == {
        "0.norm": "affine (not folded)",
        "3": "affine (not folded)",
        "1.norm": "kept as GN",
    }
    assert isinstance(unfolded[1].norm, nn.GroupNorm)
    outcome = {**fold_affines(unfolded), **kept_as_gn(unfolded)}
    assert layer_counts(outcome) == {
        "folded into the conv": 1,
        "affine (no conv before it)": 1,
        "kept as GN": 1,
    }
    torch.testing.assert_close(
        unfolded[1].weight, net[1].weight
    )  # an excluded layer's conv is not changed
    expected, _ = fold_for_inference(net, images, exclude=["1"], distill_steps=0, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(unfolded(images), expected(images), rtol=1e-4, atol=1e-5)
    _, outcome = affine_stage(net, images, include=["0"], distill_steps=0)
    assert outcome == {"0.norm": "affine (not folded)", "1.norm": "kept as GN", "3": "kept as GN"}
    with pytest.raises(ValueError, match="no GroupNorm layer"):
        affine_stage(net, images, include=["nothing.here"])


def test_without_images_the_affine_is_gns_own():
    net = gn_folding_net()
    unfolded, _ = affine_stage(net, None, distill_steps=5)
    torch.testing.assert_close(unfolded[0].norm.weight, net[0].norm.weight / (1 + 1e-5) ** 0.5)
    torch.testing.assert_close(unfolded[0].norm.bias, net[0].norm.bias)


def test_frozen_batchnorm_folds_exactly():
    torch.manual_seed(0)
    conv = Conv2d(3, 6, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(6), activation=nn.ReLU())
    randomize_norm_state(conv.norm)
    reference = copy.deepcopy(conv)
    assert fold_frozen_batchnorm(nn.Sequential(conv)) == 1 and conv.norm is None
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)
