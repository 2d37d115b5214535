import copy

import pytest
import torch
from torch import nn

import gn_det
from gn_det import calibrate, convert_norm


def _net():
    torch.manual_seed(0)
    layers = []
    channels = [3, 32, 64, 64, 64]
    for i in range(4):
        layers += [nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, stride=1 + (i % 2)),
                   nn.BatchNorm2d(channels[i + 1], momentum=None), nn.ReLU()]
    return nn.Sequential(*layers)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 3, 36, 36, generator=g), 5, 1)  # smooth
    # Each image its own brightness and contrast: GN removes what BN keeps.
    return x * (torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.5) + torch.randn(n, 1, 1, 1, generator=g)


@pytest.fixture(scope="module")
def teacher():
    """A BN network whose population statistics are computed on its own data."""
    model = _net()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(_images(64, seed=1))  # momentum=None: cumulative average
    model[4].requires_grad_(False)  # one frozen BN layer
    return model.eval()


def _outputs(model, x):
    """Output of every norm layer."""
    outputs = []
    handles = [m.register_forward_hook(lambda m, a, o: outputs.append(o))
               for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outputs


def _relative_errors(student, teacher, x):
    return [((s - t).pow(2).sum() / (t - t.mean((0, 2, 3), keepdim=True)).pow(2).sum()).item()
            for s, t in zip(_outputs(student, x), _outputs(teacher, x))]


@pytest.mark.parametrize("sequential", [True, False])
def test_calibration_beats_stats_on_held_out_images(teacher, sequential):
    stats = convert_norm(copy.deepcopy(teacher), transfer="stats")
    calibrated = convert_norm(copy.deepcopy(teacher), transfer="stats")
    fits = calibrate(calibrated, teacher, [_images(16, seed=2), _images(16, seed=3)],
                     sequential=sequential, progress=False)
    assert [f.name for f in fits] == ["1", "4", "7", "10"]
    assert all(f.error_after < f.error_before for f in fits)

    held_out = _images(32, seed=4)  # not used for calibration
    errors_stats = _relative_errors(stats, teacher, held_out)
    errors_calibrated = _relative_errors(calibrated, teacher, held_out)
    assert all(c < s for c, s in zip(errors_calibrated, errors_stats)), (errors_calibrated, errors_stats)
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        t = teacher(held_out).flatten()
        assert cos(calibrated(held_out).flatten(), t, dim=0) > cos(stats(held_out).flatten(), t, dim=0)


def test_sequential_corrects_drift_better_than_local_at_the_output(teacher):
    held_out = _images(32, seed=4)
    errors = {}
    for sequential in (True, False):
        student = convert_norm(copy.deepcopy(teacher))
        calibrate(student, teacher, [_images(32, seed=2)], sequential=sequential, progress=False)
        errors[sequential] = _relative_errors(student, teacher, held_out)[-1]
    assert errors[True] <= errors[False] * 1.05, errors


def test_teacher_is_unchanged_frozen_stays_frozen_and_results_repeat(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    grads = {n: p.requires_grad for n, p in teacher.named_parameters()}
    results = []
    for _ in range(2):
        student = convert_norm(copy.deepcopy(teacher))
        calibrate(student, teacher, [_images(16, seed=2)], progress=False)
        assert not student[4].weight.requires_grad and not student[4].bias.requires_grad
        assert student[1].weight.requires_grad
        results.append(student.state_dict())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == grads
    assert not teacher.training
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])


def test_the_teacher_must_be_the_source_model(teacher):
    student = convert_norm(copy.deepcopy(teacher))
    other = _net().eval()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="differ at '0.weight'"):
        calibrate(student, other, [_images(4, seed=2)], progress=False)
    with pytest.raises(ValueError, match="no layers converted"):
        calibrate(copy.deepcopy(teacher), teacher, [_images(4, seed=2)], progress=False)


def test_a_detectron2_mask_rcnn_calibrates_backbone_sequentially_and_heads_locally():
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from gn_det.config import load_config, resolve_config_name

    cfg = load_config(resolve_config_name("shapes/bn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    teacher = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(3, 96, 128, generator=g) * 255} for _ in range(4)]
    teacher.train()
    with torch.no_grad(), EventStorage():  # population statistics of the BN layers: a few passes
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        teacher.backbone(teacher.preprocess_image(images).tensor)
    teacher.eval()
    student = convert_norm(copy.deepcopy(teacher))
    regions = {"box_head": [], "mask_head": []}
    hooks = [getattr(teacher.roi_heads, head).register_forward_hook(
        lambda module, args, output, head=head: regions[head].append(args[0].shape[0]))
        for head in regions]
    caps = (dict(teacher.proposal_generator.post_nms_topk),
            teacher.roi_heads.box_predictor.test_topk_per_image)
    fits = calibrate(student, teacher, images, progress=False, batch_size=2,
                     head_proposals=30, head_detections=3)
    for hook in hooks:
        hook.remove()
    # The head layers were fitted on a sample of regions: <= 30 proposals and 3 detections per
    # image (2 images per teacher pass); the teacher's own settings are restored.
    assert regions["box_head"] and max(regions["box_head"]) <= 2 * 30
    assert regions["mask_head"] and max(regions["mask_head"]) <= 2 * 3
    assert (teacher.proposal_generator.post_nms_topk, teacher.roi_heads.box_predictor.test_topk_per_image) == caps
    modes = {f.name.split(".")[0]: f.mode for f in fits}
    assert modes == {"backbone": "sequential", "roi_heads": "local"}
    assert len([f for f in fits if f.mode == "sequential"]) == 20 + 8  # R-18 + FPN
    assert all(f.error_after <= f.error_before for f in fits)
