import pytest
import torch
import torch.nn.functional as F

from gn_det import TRANSFERS, transfer_bn_to_gn
from reference import (
    bn_eval,
    images_with_channel_stats,
    random_bn_state,
    stats_transfer_reference,
)

C, G, EPS = 64, 32, 1e-5


def _transfer(state, transfer, groups=G, bn_eps=EPS, gn_eps=EPS):
    return transfer_bn_to_gn(
        state["weight"],
        state["bias"],
        state["running_mean"],
        state["running_var"],
        num_groups=groups,
        bn_eps=bn_eps,
        gn_eps=gn_eps,
        transfer=transfer,
    )


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_stats_matches_the_formula_of_the_design():
    state = random_bn_state(C)
    weight, bias = _transfer(state, "stats")
    ref_weight, ref_bias = stats_transfer_reference(*state.values(), num_groups=G, eps=EPS)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.double(), ref_bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [32, 16, 8])
def test_stats_reproduces_bn_when_image_statistics_equal_the_population(groups):
    state = random_bn_state(C)
    x = images_with_channel_stats(4, state["running_mean"], state["running_var"])
    bn_out = bn_eval(
        x, state["weight"], state["bias"], state["running_mean"], state["running_var"], EPS
    )

    errors = {}
    for transfer in TRANSFERS:
        weight, bias = _transfer(state, transfer, groups=groups)
        errors[transfer] = _rel_err(F.group_norm(x, groups, weight, bias, EPS), bn_out)
    assert errors["stats"] < 0.05
    assert errors["stats"] < 1e-3  # the match is exact up to float error here
    assert errors["copy"] > 10 * errors["stats"]
    assert errors["copy"] > 0.2


def test_stats_with_a_different_gn_eps_still_matches():
    state = random_bn_state(C)
    state["running_var"] = state["running_var"] * 1e-3  # eps matters at small variances
    x = images_with_channel_stats(2, state["running_mean"], state["running_var"])
    bn_out = bn_eval(
        x, state["weight"], state["bias"], state["running_mean"], state["running_var"], 1e-3
    )
    weight, bias = _transfer(state, "stats", bn_eps=1e-3, gn_eps=1e-5)
    assert _rel_err(F.group_norm(x, G, weight, bias, 1e-5), bn_out) < 1e-3


def test_stats_reduces_to_copy_for_affine_only_checkpoints():
    # MSRA R-50.pkl loaded into FrozenBN: mean 0, running_var = 1 - eps, so sigma = 1.
    state = random_bn_state(C)
    state["running_mean"] = torch.zeros(C)
    state["running_var"] = torch.ones(C) - EPS
    weight, bias = _transfer(state, "stats")
    torch.testing.assert_close(weight, state["weight"])
    torch.testing.assert_close(bias, state["bias"])


def test_copy_keeps_gamma_and_beta():
    state = random_bn_state(C)
    weight, bias = _transfer(state, "copy")
    assert torch.equal(weight, state["weight"]) and torch.equal(bias, state["bias"])


def test_stats_without_running_statistics_falls_back_to_copy():
    state = random_bn_state(C)
    weight, bias = transfer_bn_to_gn(
        state["weight"], state["bias"], None, None, num_groups=G, bn_eps=EPS, gn_eps=EPS
    )
    assert torch.equal(weight, state["weight"]) and torch.equal(bias, state["bias"])


def test_low_precision_inputs_keep_their_dtype():
    state = {k: v.half() for k, v in random_bn_state(C).items()}
    weight, bias = _transfer(state, "stats")
    assert weight.dtype == bias.dtype == torch.float16
    ref_weight, _ = stats_transfer_reference(
        *(v.float() for v in state.values()), num_groups=G, eps=EPS
    )
    torch.testing.assert_close(weight.double(), ref_weight, rtol=2e-3, atol=2e-3)


def test_unknown_transfer_lists_the_valid_ones():
    with pytest.raises(ValueError, match="copy, stats"):
        _transfer(random_bn_state(C), "magic")


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="does not divide"):
        _transfer(random_bn_state(C), "stats", groups=24)
