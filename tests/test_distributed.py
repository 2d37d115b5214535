"""The mission's claim, tested: under GN, 2 processes x 1 image train exactly like 1 process x 2
images; under BN they do not. detectron2's launch, gloo on CPU, DDP without device_ids.

The norm is isolated: a converted ResNet-18 + FPN backbone under a deterministic per-image
loss, since Mask R-CNN's per-process anchor/proposal sampling would differ anyway. The processes
start on a pretend GPU host (``gpu_host``): a CPU run must pick gloo there too.
"""

import pytest
import torch
import torch.distributed as dist
from detectron2.utils import comm

import gn_det
from gn_det.cli.train import launch
from gn_det.engine import create_ddp_model
from models import resnet18_fpn_backbone

STEPS, LR = 3, 0.05


def _backbone(norm: str):
    backbone = resnet18_fpn_backbone(freeze_at=0)
    return (gn_det.convert_norm(backbone) if norm == "GN" else backbone).double()


def _images():
    g = torch.Generator().manual_seed(1)
    # Each image its own brightness and contrast: batch statistics differ from image statistics.
    images = torch.rand(STEPS, 2, 3, 64, 64, generator=g)
    scale = torch.rand(STEPS, 2, 1, 1, 1, generator=g) * 3 + 0.5
    return (images * scale + torch.randn(STEPS, 2, 1, 1, 1, generator=g)).double()


def _per_image_loss(features):
    """Mean over images of a deterministic function of that image's features alone."""
    per_image = sum((f**2).flatten(1).mean(1) + f.flatten(1).mean(1) for f in features.values())
    return per_image.mean()


def _train(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for images in batches:
        optimizer.zero_grad()
        _per_image_loss(model(images)).backward()
        optimizer.step()
    return model


def _worker(norm, out_path):
    assert dist.get_backend() == "gloo" and not torch.cuda.is_available()
    model = create_ddp_model(_backbone(norm), broadcast_buffers=False)
    rank = comm.get_rank()
    _train(model, [step[rank : rank + 1] for step in _images()])  # 1 image per process
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.module.named_parameters()}, out_path)


def _max_relative_difference(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b)


@pytest.mark.parametrize("norm, agree", [("GN", True), ("BN", False)])
def test_two_processes_of_one_image_equal_one_process_of_two(norm, agree, tmp_path, gpu_host):
    out = tmp_path / f"{norm}.pth"
    launch(_worker, 2, device="cpu", dist_url="auto", args=(norm, str(out)))
    distributed = torch.load(out, weights_only=True)

    single = _train(_backbone(norm), list(_images()))
    reference = {k: v.detach() for k, v in single.named_parameters()}
    initial = {k: v.detach() for k, v in _backbone(norm).named_parameters()}
    assert _max_relative_difference(reference, initial) > 1e-2  # training moved the weights

    difference = _max_relative_difference(distributed, reference)
    print(f"{norm}: max relative parameter difference, 2x1 vs 1x2 images: {difference:.2e}")
    if agree:
        assert difference < 1e-9
    else:
        assert difference > 1e-2
