import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gn_det import ConvertedGroupNorm
from reference import random_bn_state, stats_transfer_reference

C, G, EPS = 64, 32, 1e-5


def _unbiased_group_norm(x, groups, weight, bias, eps):
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=True, keepdim=True)
    y = ((xg - mean) / (var + eps).sqrt()).reshape_as(x)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


def test_forward_equals_functional_group_norm_with_biased_variance():
    layer = ConvertedGroupNorm(G, C)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(2, C, 5, 7)
    expected = F.group_norm(x, G, layer.weight, layer.bias, EPS)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # GN's variance is the biased one; the unbiased formula gives visibly different output
    # (2 channels x 35 pixels per group: a factor 70/69 in the variance).
    unbiased = _unbiased_group_norm(x, G, layer.weight, layer.bias, EPS)
    assert (unbiased - expected).abs().max() > 1e-3
    biased_by_hand = F.group_norm(x, G, eps=EPS) * layer.weight.reshape(
        1, C, 1, 1
    ) + layer.bias.reshape(1, C, 1, 1)
    torch.testing.assert_close(layer(x), biased_by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transfer", ["stats", "copy"])
def test_loads_bn_state_with_transfer_and_saves_plain_gn(transfer):
    state = random_bn_state(C)
    bn = nn.BatchNorm2d(C)
    bn.load_state_dict({**state, "num_batches_tracked": torch.tensor(7)})
    layer = ConvertedGroupNorm(G, C, transfer=transfer)
    result = layer.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if transfer == "stats":
        ref_w, ref_b = stats_transfer_reference(*state.values(), num_groups=G, eps=EPS)
    else:
        ref_w, ref_b = state["weight"], state["bias"]
    torch.testing.assert_close(layer.weight.double(), ref_w.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.double(), ref_b.double(), rtol=1e-5, atol=1e-6)
    assert set(layer.state_dict()) == {"weight", "bias"}
    # Its saved state loads strictly into a plain nn.GroupNorm, and back into itself unchanged.
    plain = nn.GroupNorm(G, C)
    plain.load_state_dict(layer.state_dict(), strict=True)
    again = ConvertedGroupNorm(G, C, transfer=transfer)
    again.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(again.weight, layer.weight)


def test_bn_state_inside_a_model_and_the_eps_of_the_source():
    state = random_bn_state(C)
    source = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C, eps=1e-3))
    source[1].load_state_dict(state, strict=False)
    target = nn.Sequential(nn.Conv2d(3, C, 3), ConvertedGroupNorm(G, C, eps=1e-3, source_eps=1e-3))
    target.load_state_dict(source.state_dict(), strict=True)
    ref_w, _ = stats_transfer_reference(*state.values(), num_groups=G, eps=1e-3)
    torch.testing.assert_close(target[1].weight.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_bn_state_of_the_wrong_size_is_a_clear_size_mismatch():
    layer = ConvertedGroupNorm(G, C)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(nn.BatchNorm2d(2 * C).state_dict())


def test_load_keeps_requires_grad():
    layer = ConvertedGroupNorm(G, C)
    layer.requires_grad_(False)
    layer.load_state_dict(nn.BatchNorm2d(C).state_dict())
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_unknown_transfer_is_rejected_at_construction():
    with pytest.raises(ValueError, match="valid transfers: copy, stats"):
        ConvertedGroupNorm(G, C, transfer="affine")
