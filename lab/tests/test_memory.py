"""gn_det_lab.memory.SavedForBackward: the bytes autograd keeps for backward."""

import torch
from torch import nn

from gn_det_lab.memory import SavedForBackward


def test_saved_bytes_are_the_live_saved_storages_parameters_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU())
    x = torch.randn(8, 64, requires_grad=True)
    with SavedForBackward() as everything:
        model(x).sum().backward()
    assert everything.nbytes == x.nbytes  # backward freed what it kept; x is still ours
    with SavedForBackward() as everything:
        first = model(x)
    with SavedForBackward(model.parameters()) as activations:
        out = model(x)
    # The linear layer keeps its input and its weight, the ReLU its output.
    assert activations.nbytes == x.nbytes + out.nbytes == 8 * 64 * 4 + 8 * 32 * 4
    assert everything.nbytes == activations.nbytes + model[0].weight.nbytes
    # Outside the context nothing is recorded.
    model(x).sum().backward()
    assert activations.nbytes == x.nbytes + out.nbytes
    del first


def test_group_norm_keeps_its_input_and_recompute_does_not():
    """What the norm benchmarks measure: a conv + GN keeps the conv's output for GN's backward;
    recomputed (gn_det.enable_recompute) it keeps only the conv's input."""
    import copy

    from detectron2.layers import Conv2d

    from gn_det import enable_recompute

    torch.manual_seed(0)
    plain = nn.Sequential(Conv2d(8, 16, 3, padding=1, bias=False, norm=nn.GroupNorm(4, 16))).train()
    recomputing = copy.deepcopy(plain)
    assert enable_recompute(recomputing) == 1
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    saved = {}
    for name, model in (("plain", plain), ("recompute", recomputing)):
        with SavedForBackward(model.parameters()) as found:
            out = model(x)
        saved[name] = found.nbytes
        del out
    conv_output = 2 * 16 * 16 * 16 * 4
    assert saved["recompute"] == x.nbytes
    assert saved["plain"] >= x.nbytes + conv_output
