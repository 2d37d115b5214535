"""gn_det.recompute: conv + GN recomputed in backward — same numbers, fewer saved bytes.

The reference is the same model without recompute (detectron2's plain ``Conv2d.forward``), and
the memory measure is independent of the implementation: the bytes of every distinct storage that
autograd holds for backward when the forward ends (``saved_tensors_hooks``; parameters excluded,
the model holds those anyway).
"""

import copy
import pickle

import pytest
import torch
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import gn_det
import gn_det.recompute
from gn_det import RecomputeConv2d, disable_recompute, enable_recompute
from gn_det.cli.config_files import CONFIGS_DIR, load_config
from gn_det_lab.memory import SavedForBackward  # the benchmarks' measure, one definition
from models import resnet18_fpn_backbone


def _backbone():
    """Converted ResNet-18 + FPN with frozen stem and res2 (FREEZE_AT 2), in training mode."""
    model = gn_det.convert_norm(resnet18_fpn_backbone(freeze_at=2)).train()
    # Non-trivial GN affines, so a wrong recompute would show in the gradients.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="module")
def models():
    plain = _backbone()
    recomputing = copy.deepcopy(plain)
    count = enable_recompute(recomputing)
    return plain, recomputing, count


def _images(size, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, size, size, generator=g).requires_grad_(requires_grad)


def _loss(features):
    return sum((f**2).mean() + f.mean() for f in features.values())


def _loss_and_grads(model, images):
    model.zero_grad(set_to_none=True)
    loss = _loss(model(images))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, images):
    """Bytes autograd keeps for backward after ``model(images)``, parameters excluded."""
    with SavedForBackward(model.parameters()) as saved:
        out = model(images)
    nbytes = saved.nbytes
    del out
    return nbytes


def test_counts_every_conv_with_group_norm_and_is_idempotent(models):
    plain, recomputing, count = models
    expected = sum(
        isinstance(m, Conv2d) and isinstance(m.norm, nn.GroupNorm) for m in plain.modules()
    )
    assert count == expected > 0
    recomputing_convs = [m for m in recomputing.modules() if isinstance(m, RecomputeConv2d)]
    assert any(not m.weight.requires_grad for m in recomputing_convs), "FREEZE_AT 2: frozen convs"
    assert enable_recompute(recomputing) == count
    assert sum(type(m) is RecomputeConv2d for m in recomputing.modules()) == count
    assert not any(isinstance(m, RecomputeConv2d) for m in plain.modules())


def test_state_dict_unchanged(models):
    plain, recomputing, _ = models
    a, b = plain.state_dict(), recomputing.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # Still a plain module tree: picklable, and loadable into a plain model.
    copy.deepcopy(plain).load_state_dict(pickle.loads(pickle.dumps(recomputing)).state_dict())


def test_same_loss_and_gradients(models):
    plain, recomputing, _ = models
    images = _images(64)
    loss, grads = _loss_and_grads(plain, images)
    loss_r, grads_r = _loss_and_grads(recomputing, images)
    torch.testing.assert_close(loss_r, loss)
    assert grads.keys() == grads_r.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], msg=name)


def test_same_loss_and_gradients_under_autocast(models):
    """Under autocast the recomputation in backward must run in the same precision as the
    forward did (torch.utils.checkpoint replays the autocast state): the gradients then equal
    the plain model's, and the saved activations are the low-precision ones. bfloat16 on the
    CPU exercises the checkpoint's autocast path that float16 takes on CUDA; the dtypes differ
    there (CUDA autocast runs group_norm in float32, so GN's saved input and output are float32)."""
    plain, recomputing, _ = models
    images = _images(64)
    results = []
    for model in (plain, recomputing):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model(images)
        assert all(f.dtype == torch.bfloat16 for f in features.values())
        loss = _loss({k: v.float() for k, v in features.items()})
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss, grads), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_r, loss)
    assert grads.keys() == grads_r.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], msg=name)


def test_gradient_reaches_trainable_layer_through_frozen_recomputed_layer():
    torch.manual_seed(0)
    norm, relu = nn.GroupNorm(2, 8), nn.ReLU()
    frozen = Conv2d(4, 8, 3, padding=1, bias=False, norm=norm, activation=relu)
    frozen.requires_grad_(False)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), frozen).train()
    recomputing = copy.deepcopy(plain)
    assert enable_recompute(recomputing) == 1
    x = torch.randn(2, 3, 8, 8)
    for model in (plain, recomputing):
        model(x).pow(2).mean().backward()
    for p, q in zip(plain.parameters(), recomputing.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad)
    assert recomputing[0].weight.grad is not None


def test_no_checkpoint_when_nothing_needs_a_gradient(models, monkeypatch):
    plain, recomputing, _ = models
    calls = []
    real = gn_det.recompute.checkpoint
    monkeypatch.setattr(
        gn_det.recompute, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    images = _images(64)
    try:
        plain.eval(), recomputing.eval()
        expected = plain(images)
        for name, value in recomputing(images).items():  # eval, gradients enabled
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
        plain.train(), recomputing.train()
        with torch.no_grad():
            expected = plain(images)
            for name, value in recomputing(images).items():
                torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    finally:
        plain.train(), recomputing.train()
    assert calls == []
    recomputing(images)  # training: only the trainable stages checkpoint
    trainable = [m for m in recomputing.modules() if isinstance(m, RecomputeConv2d)]
    assert len(calls) == sum(m.weight.requires_grad for m in trainable)


def test_saves_fewer_bytes_for_backward(models):
    plain, recomputing, _ = models
    images = _images(256)
    without, with_recompute = _saved_bytes(plain, images), _saved_bytes(recomputing, images)
    ratio = with_recompute / without
    mib = 2**20
    print(f"saved: {without / mib:.1f} -> {with_recompute / mib:.1f} MiB ({ratio:.2f}x)")
    assert ratio < 0.6  # measured 0.45: each GN input (conv output) is no longer kept


def test_disable_restores_plain_convs():
    model = _backbone()
    count = enable_recompute(model)
    assert disable_recompute(model) == count
    assert not any(isinstance(m, RecomputeConv2d) for m in model.modules())
    assert disable_recompute(model) == 0


def _batch():
    g = torch.Generator().manual_seed(2)
    batch = []
    for _ in range(2):
        image = torch.rand(3, 96, 96, generator=g) * 255
        masks = torch.zeros(2, 96, 96, dtype=torch.bool)
        masks[0, 10:40, 20:60] = True
        masks[1, 50:90, 30:70] = True
        instances = Instances((96, 96))
        boxes = [[20.0, 10.0, 60.0, 40.0], [30.0, 50.0, 70.0, 90.0]]
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor([0, 2])
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": instances})
    return batch


def _train_step(recompute):
    cfg = load_config(CONFIGS_DIR / "shapes" / "gn.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NORM_CONVERSION.RECOMPUTE = recompute
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.manual_seed(1)  # same proposal sampling in both runs
    with EventStorage():
        losses = model(_batch())
    total = sum(losses.values())
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, losses, grads


def test_config_key_builds_a_recomputing_model_that_trains():
    assert gn_det.get_cfg().MODEL.NORM_CONVERSION.RECOMPUTE is False
    model, losses, grads = _train_step(recompute=True)
    # Backbone, FPN and both ROI heads' conv + GN layers.
    names = [n for n, m in model.named_modules() if isinstance(m, RecomputeConv2d)]
    assert any(n.startswith("backbone.bottom_up") for n in names)
    assert any(n.startswith("backbone.fpn") for n in names)
    assert any(n.startswith("roi_heads.mask_head") for n in names)
    assert any(n.startswith("roi_heads.box_head") for n in names)
    assert all(torch.isfinite(v) for v in losses.values())

    plain, plain_losses, plain_grads = _train_step(recompute=False)
    assert not any(isinstance(m, RecomputeConv2d) for m in plain.modules())
    assert list(plain.state_dict()) == list(model.state_dict())
    for name in plain_losses:
        torch.testing.assert_close(losses[name], plain_losses[name], msg=name)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], msg=name)
