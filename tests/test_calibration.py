import copy
import re

import pytest
import torch
from torch import nn

import gn_det
from gn_det import calibrate, calibration, convert_norm

from models import bn_teacher_net, photometric_images, randomize_norm_state, shapes_bn_mask_rcnn


_images = photometric_images


@pytest.fixture(scope="module")
def teacher():
    """A BN network whose population statistics are computed on its own data."""
    return bn_teacher_net()


def _outputs(model, x):
    """Output of every norm layer."""
    outputs = []
    handles = [
        m.register_forward_hook(lambda m, a, o: outputs.append(o))
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outputs


def _relative_errors(student, teacher, x):
    return [
        ((s - t).pow(2).sum() / (t - t.mean((0, 2, 3), keepdim=True)).pow(2).sum()).item()
        for s, t in zip(_outputs(student, x), _outputs(teacher, x))
    ]


@pytest.mark.parametrize("sequential", [True, False])
def test_calibration_beats_stats_on_held_out_images(teacher, sequential):
    stats = convert_norm(copy.deepcopy(teacher), transfer="stats")
    calibrated = convert_norm(copy.deepcopy(teacher), transfer="stats")
    fits = calibrate(
        calibrated,
        teacher,
        [_images(16, seed=2), _images(16, seed=3)],
        sequential=sequential,
        progress=False,
    )
    assert [f.name for f in fits] == ["1", "4", "7", "10"]
    assert all(f.error_after < f.error_before for f in fits)

    held_out = _images(32, seed=4)  # not used for calibration
    errors_stats = _relative_errors(stats, teacher, held_out)
    errors_calibrated = _relative_errors(calibrated, teacher, held_out)
    assert all(c < s for c, s in zip(errors_calibrated, errors_stats)), (
        errors_calibrated,
        errors_stats,
    )
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        t = teacher(held_out).flatten()
        assert cos(calibrated(held_out).flatten(), t, dim=0) > cos(
            stats(held_out).flatten(), t, dim=0
        )


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
    other = bn_teacher_net()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="differ at '0.weight'"):
        calibrate(student, other, [_images(4, seed=2)], progress=False)
    with pytest.raises(ValueError, match="no layers converted"):
        calibrate(copy.deepcopy(teacher), teacher, [_images(4, seed=2)], progress=False)


def test_a_detectron2_mask_rcnn_calibrates_backbone_sequentially_and_heads_locally():
    teacher, images = shapes_bn_mask_rcnn()
    student = convert_norm(copy.deepcopy(teacher))
    regions = {"box_head": [], "mask_head": []}
    hooks = [
        getattr(teacher.roi_heads, head).register_forward_hook(
            lambda module, args, output, head=head: regions[head].append(args[0].shape[0])
        )
        for head in regions
    ]
    caps = (
        dict(teacher.proposal_generator.post_nms_topk),
        teacher.roi_heads.box_predictor.test_topk_per_image,
    )
    fits = calibrate(
        student, teacher, images, progress=False, batch_size=2, head_proposals=30, head_detections=3
    )
    for hook in hooks:
        hook.remove()
    # The head layers were fitted on a sample of regions: <= 30 proposals and 3 detections per
    # image (2 images per teacher pass); the teacher's own settings are restored.
    assert regions["box_head"] and max(regions["box_head"]) <= 2 * 30
    assert regions["mask_head"] and max(regions["mask_head"]) <= 2 * 3
    assert (
        teacher.proposal_generator.post_nms_topk,
        teacher.roi_heads.box_predictor.test_topk_per_image,
    ) == caps
    modes = {f.name.split(".")[0]: f.mode for f in fits}
    assert modes == {"backbone": "sequential", "roi_heads": "local"}
    assert len([f for f in fits if f.mode == "sequential"]) == 20 + 8  # R-18 + FPN
    assert all(f.error_after <= f.error_before for f in fits)


def test_memory_is_bounded_by_the_batch_and_chunks_fit_close_to_one_pass(teacher):
    seen = []
    x = _images(32, seed=2)
    held_out = _images(32, seed=4)
    students = {}
    for batch_size in (32, 4):
        student = convert_norm(copy.deepcopy(teacher))
        hook = student[0].register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
        fits = calibrate(student, teacher, [x], batch_size=batch_size, progress=False)
        hook.remove()
        assert all(f.error_after < f.error_before for f in fits)
        students[batch_size] = student
    # One doubled pass of all 32 images, then 8 doubled passes of 4: never more than 2 x 4 at once.
    assert seen == [64] + [8] * 8
    one_pass = _relative_errors(students[32], teacher, held_out)
    chunked = _relative_errors(students[4], teacher, held_out)
    stats = _relative_errors(convert_norm(copy.deepcopy(teacher)), teacher, held_out)
    for c, o, s in zip(chunked, one_pass, stats):
        assert c < s and abs(c - o) <= 0.1 * o, (chunked, one_pass, stats)


def test_head_layers_are_fitted_on_the_backbone_features_of_the_paired_pass(monkeypatch):
    """The teacher's heads run on the teacher half of the paired pass: the same fits as a full
    teacher pass, without running the teacher's backbone again."""
    teacher, images = shapes_bn_mask_rcnn()
    reused, full = convert_norm(copy.deepcopy(teacher)), convert_norm(copy.deepcopy(teacher))
    backbone_calls = []
    hook = teacher.backbone.register_forward_hook(lambda m, a, o: backbone_calls.append(1))
    fits = calibrate(reused, teacher, images, progress=False, batch_size=2)
    assert backbone_calls == []
    monkeypatch.setattr(calibration, "heads_run_on_features", lambda model: False)
    fits_full = calibrate(full, teacher, images, progress=False, batch_size=2)
    hook.remove()
    assert len(backbone_calls) == 2  # one teacher pass per chunk
    assert [f.name for f in fits] == [f.name for f in fits_full]
    heads = [f.name for f in fits if f.mode == "local"]
    assert heads
    state, state_full = reused.state_dict(), full.state_dict()
    for name in heads:
        for p in ("weight", "bias"):
            torch.testing.assert_close(
                state[f"{name}.{p}"], state_full[f"{name}.{p}"], rtol=1e-4, atol=1e-5
            )


def test_bad_batch_size_is_refused(teacher):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        calibrate(convert_norm(copy.deepcopy(teacher)), teacher, [_images(4, seed=2)], batch_size=0)


def test_one_batch_tensor_is_the_same_input_as_a_list_of_batches(teacher):
    images = _images(8, seed=2)
    from_tensor = convert_norm(copy.deepcopy(teacher), transfer="stats")
    from_list = convert_norm(copy.deepcopy(teacher), transfer="stats")
    fits_tensor = calibrate(from_tensor, teacher, images, progress=False, batch_size=4)
    fits_list = calibrate(
        from_list, teacher, [images[:3], images[3:]], progress=False, batch_size=4
    )
    assert [f.error_after for f in fits_tensor] == pytest.approx([f.error_after for f in fits_list])
    for a, b in zip(from_tensor.state_dict().values(), from_list.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (
            [torch.rand(5)],
            "batch tensors (N, C, ...) or a list of them; got a tensor of shape (5,)",
        ),
        ([torch.rand(2, 3, 32, 32), torch.rand(2, 4, 32, 32)], "differ in their per-sample shape"),
        (["image.png"], "got str"),
    ],
)
def test_wrong_input_shapes_say_what_is_expected(teacher, inputs, message):
    student = convert_norm(copy.deepcopy(teacher), transfer="stats")
    with pytest.raises(ValueError, match=re.escape(message)):
        calibrate(student, teacher, inputs, progress=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        gn_det.distill(student, teacher, inputs, steps=1, progress=False)


def test_detectron2_model_takes_a_batch_tensor_as_images():
    teacher, images = shapes_bn_mask_rcnn()
    batch = torch.stack([d["image"] for d in images[:2]])
    from_batch = convert_norm(copy.deepcopy(teacher), transfer="stats")
    from_dicts = convert_norm(copy.deepcopy(teacher), transfer="stats")
    calibrate(from_batch, teacher, batch, progress=False, batch_size=2)
    calibrate(from_dicts, teacher, images[:2], progress=False, batch_size=2)
    for a, b in zip(from_batch.state_dict().values(), from_dicts.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(
        ValueError, match=r"'image': a \(C, H, W\) tensor; got shape \(1, 3, 8, 8\)"
    ):
        calibrate(from_batch, teacher, [{"image": torch.rand(1, 3, 8, 8)}], progress=False)


def test_consumers_know_what_follows_each_norm_in_detectron2_and_torchvision_resnets():
    import torchvision

    teacher, _ = shapes_bn_mask_rcnn()
    found = calibration._consumers(teacher)
    bottom = "backbone.bottom_up"
    assert found[f"{bottom}.stem.conv1.norm"] == ("relu",)
    assert found[f"{bottom}.res2.0.conv1.norm"] == ("relu",)
    assert found[f"{bottom}.res2.0.conv2.norm"] == (
        "residual",
        f"{bottom}.res2.0",
        None,
    )  # identity
    assert found[f"{bottom}.res3.0.conv2.norm"] == (
        "residual",
        f"{bottom}.res3.0",
        f"{bottom}.res3.0.shortcut",
    )
    assert f"{bottom}.res3.0.shortcut.norm" not in found  # added, then ReLU'd with the main path
    assert not [n for n in found if n.startswith("backbone.fpn")]  # FPN: nothing follows its norms
    assert found["roi_heads.box_head.conv1.norm"] == ("relu",)  # detectron2 Conv2d(activation=relu)
    assert found["roi_heads.mask_head.mask_fcn1.norm"] == ("relu",)
    tv = calibration._consumers(torchvision.models.resnet50())
    assert tv["bn1"] == tv["layer1.0.bn1"] == tv["layer1.0.bn2"] == ("relu",)
    assert tv["layer1.0.bn3"] == ("residual", "layer1.0", "layer1.0.downsample")
    assert tv["layer1.1.bn3"] == ("residual", "layer1.1", None)


def test_a_residual_blocks_last_norm_is_the_least_squares_fit_to_the_block_output():
    """One chunk: bn2's affine is the closed-form fit of (teacher output − student shortcut) on
    ĝ over the pixels where the teacher's or the (initial) student's block output is active."""
    import torchvision

    torch.manual_seed(0)
    teacher = torchvision.models.resnet.BasicBlock(32, 32)
    randomize_norm_state(teacher)
    teacher.eval()
    x = torch.randn(6, 32, 12, 12) * torch.rand(6, 1, 1, 1) * 3
    student = convert_norm(copy.deepcopy(teacher), transfer="stats")
    initial = student.bn2.weight.detach().clone(), student.bn2.bias.detach().clone()
    fits = calibrate(student, teacher, [x], progress=False, batch_size=6)
    assert [f.name for f in fits] == ["bn1", "bn2"]
    with torch.no_grad():
        g = torch.nn.functional.group_norm(
            student.conv2(student.relu(student.bn1(student.conv1(x)))), 32
        )
        y = teacher(x)
        shape = (1, -1, 1, 1)
        active = (y > 0) | (g * initial[0].view(shape) + initial[1].view(shape) + x > 0)
    for c in range(32):
        m = active[:, c]
        design = torch.stack([g[:, c][m], torch.ones(int(m.sum()))], 1).double()
        a, b = torch.linalg.lstsq(design, (y - x)[:, c][m].double().unsqueeze(1)).solution.flatten()
        torch.testing.assert_close(student.bn2.weight[c].double(), a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(student.bn2.bias[c].double(), b, rtol=1e-4, atol=1e-5)


def test_an_unknown_objective_is_refused(teacher):
    with pytest.raises(ValueError, match="objective must be 'activation' or 'output'"):
        calibrate(
            convert_norm(copy.deepcopy(teacher)), teacher, [_images(2, seed=0)], objective="relu"
        )


def test_the_least_squares_sums_live_on_the_activations_device():
    """A model on a GPU is calibrated there: the running sums follow the activations' device
    (they were made on the CPU, and CUDA sums were added into them in place). Checked on the
    meta device, which no CPU tensor can be mixed with."""
    moments = calibration._Moments(4)
    s, t = torch.empty(2, 4, 3, 3, device="meta"), torch.empty(2, 4, 3, 3, device="meta")
    moments.add(s, t)
    moments.add(s, t, mask=torch.empty(2, 4, 3, 3, device="meta", dtype=torch.bool))
    assert moments.sums.device.type == "meta" and moments.sums.shape == (6, 4)
    a, b = moments.solve(
        torch.ones(4, device="meta", dtype=torch.float64),
        torch.zeros(4, device="meta", dtype=torch.float64),
    )
    assert a.device.type == b.device.type == "meta"


def _d2_bn_teacher_net():
    """:func:`bn_teacher_net` built of detectron2 ``Conv2d`` layers holding their BN and ReLU
    (what Weight Standardization pairs), population statistics on photometric images."""
    from detectron2.layers import Conv2d

    torch.manual_seed(0)
    channels = [3, 32, 64, 64, 64]
    model = nn.Sequential(*[
        Conv2d(channels[i], channels[i + 1], 3, padding=1, stride=1 + (i % 2), bias=False,
               norm=nn.BatchNorm2d(channels[i + 1], momentum=None), activation=nn.ReLU())
        for i in range(4)
    ])
    with torch.no_grad():
        for _ in range(4):
            model(photometric_images(64, seed=1))
    return model.eval()


@pytest.mark.parametrize("sequential", [True, False])
def test_calibration_of_a_gn_ws_student_beats_its_stats_transfer(sequential):
    # The paired pass runs the teacher half of each standardising conv with the raw weight, and
    # local fits convolve the teacher conv's input as the student does.
    teacher = _d2_bn_teacher_net()
    stats = convert_norm(copy.deepcopy(teacher), weight_standardization=True)
    calibrated = convert_norm(copy.deepcopy(teacher), weight_standardization=True)
    fits = calibrate(calibrated, teacher, [_images(16, seed=2), _images(16, seed=3)],
                     sequential=sequential, progress=False)
    assert [f.name for f in fits] == ["0.norm", "1.norm", "2.norm", "3.norm"]
    assert all(f.error_after < f.error_before for f in fits)
    assert all(type(m).__name__ == "WSConv2d" for m in calibrated)  # classes restored
    held_out = _images(32, seed=4)
    errors_stats = _relative_errors(stats, teacher, held_out)
    errors_calibrated = _relative_errors(calibrated, teacher, held_out)
    assert all(c < s for c, s in zip(errors_calibrated, errors_stats)), (
        errors_calibrated, errors_stats)
    # Not a fit to the wrong target: as close to the teacher as GN alone calibrated the same
    # (within 10 %; a teacher half through the standardised conv gave errors of about 190).
    gn = convert_norm(copy.deepcopy(teacher))
    calibrate(gn, teacher, [_images(16, seed=2), _images(16, seed=3)], sequential=sequential,
              progress=False)
    errors_gn = _relative_errors(gn, teacher, held_out)
    assert all(w < 1.1 * g for w, g in zip(errors_calibrated, errors_gn)), (
        errors_calibrated, errors_gn)


def test_a_gn_ws_detectron2_mask_rcnn_calibrates_heads_on_standardised_inputs():
    teacher, images = shapes_bn_mask_rcnn()
    student = convert_norm(copy.deepcopy(teacher), weight_standardization=True)
    fits = calibrate(student, teacher, images, progress=False, batch_size=2, head_proposals=30,
                     head_detections=3)
    assert {f.mode for f in fits} == {"sequential", "local"}
    assert all(f.error_after <= f.error_before for f in fits)
    assert all(f.error_after < 1 for f in fits if f.mode == "local"), fits
