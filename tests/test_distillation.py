import copy

import pytest
import torch

from gn_det import calibrate, convert_norm, distill
from gn_det.layers import ConvertedGroupNorm
from models import bn_teacher_net, photometric_images, shapes_bn_mask_rcnn


@pytest.fixture(scope="module")
def teacher():
    return bn_teacher_net()


def _output_error(student, teacher, x):
    with torch.no_grad():
        t, s = teacher(x), student(x)
    return ((s - t).pow(2).sum() / (t - t.mean((0, 2, 3), keepdim=True)).pow(2).sum()).item()


def test_distillation_after_calibration_lowers_the_held_out_output_error(teacher):
    x, held_out = photometric_images(32, seed=2), photometric_images(32, seed=4)
    student = convert_norm(copy.deepcopy(teacher))
    calibrate(student, teacher, [x], progress=False)
    calibrated = _output_error(student, teacher, held_out)
    result = distill(student, teacher, [x], steps=60, lr=0.01, batch_size=8, progress=False)
    distilled = _output_error(student, teacher, held_out)
    assert distilled < 0.95 * calibrated, (calibrated, distilled)
    assert len(result.losses) == 60 and sum(result.losses[-10:]) < sum(result.losses[:10])
    # The trained scalars: the affine of the three GN layers that are not frozen.
    assert result.parameters == 2 * (32 + 64 + 64) and result.heads == "none"  # no ROI heads


def test_only_unfrozen_gn_affine_changes_teacher_untouched_and_results_repeat(teacher):
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = photometric_images(16, seed=2)
    results = []
    for _ in range(2):
        student = convert_norm(copy.deepcopy(teacher))
        before = {k: v.clone() for k, v in student.state_dict().items()}
        flags = {n: p.requires_grad for n, p in student.named_parameters()}
        student.train()
        distill(student, teacher, [x], steps=5, batch_size=4, seed=3, progress=False)
        assert (
            student.training
            and {n: p.requires_grad for n, p in student.named_parameters()} == flags
        )
        after = student.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {
            f"{i}.{p}" for i in (1, 7, 10) for p in ("weight", "bias")
        }  # 4 is frozen
        results.append(after)
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key])
    assert not teacher.training


def _changed_modules(student, teacher, images, **kwargs):
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill(student, teacher, images, steps=2, batch_size=2, progress=False, **kwargs)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    after = student.state_dict()
    return {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}, result


def test_a_detectron2_mask_rcnn_distills_backbone_gn_and_roi_heads():
    teacher, images = shapes_bn_mask_rcnn()
    student = convert_norm(copy.deepcopy(teacher))
    converted = {n for n, m in student.named_modules() if isinstance(m, ConvertedGroupNorm)}
    assert {n.split(".")[0] for n in converted} == {"backbone", "roi_heads"}
    changed, result = _changed_modules(student, teacher, images, heads="norms")
    assert result.heads == "norms"
    assert changed == converted and result.parameters == sum(
        p.numel() for n, m in student.named_modules() if n in converted for p in m.parameters()
    )

    changed, _ = _changed_modules(
        convert_norm(copy.deepcopy(teacher)), teacher, images, heads="none"
    )
    assert changed == {n for n in converted if n.startswith("backbone.")}

    # By default every weight of the box and mask heads is trained too (frozen ones excepted);
    # the backbone's convolutions, the RPN and the box predictor are not.
    student = convert_norm(copy.deepcopy(teacher))
    frozen = (
        student.roi_heads.mask_head.mask_fcn1.weight
    )  # a convolution without bias (its norm has one)
    frozen.requires_grad_(False)
    changed, result = _changed_modules(student, teacher, images)
    heads = {
        n
        for n, m in student.named_modules()
        if n.startswith(("roi_heads.box_head.", "roi_heads.mask_head."))
        and next(m.parameters(recurse=False), None) is not None
    }
    assert (
        changed == converted | heads - {"roi_heads.mask_head.mask_fcn1"}
        and result.heads == "weights"
    )
    assert not frozen.requires_grad and all(
        p.requires_grad for n, p in student.named_parameters() if p is not frozen
    )
    assert result.parameters == sum(
        p.numel()
        for n, p in student.named_parameters()
        if n.rsplit(".", 1)[0] in converted | heads and p is not frozen
    )


def test_bad_arguments_are_refused(teacher):
    student = convert_norm(copy.deepcopy(teacher))
    with pytest.raises(ValueError, match="at least 1"):
        distill(student, teacher, [photometric_images(4, seed=2)], steps=0)
    with pytest.raises(ValueError, match="heads must be one of weights, norms, none, got 'all'"):
        distill(student, teacher, [photometric_images(4, seed=2)], heads="all")
    with pytest.raises(ValueError, match="at least one input"):
        distill(student, teacher, [])
    with pytest.raises(ValueError, match="no trainable layers converted"):
        distill(copy.deepcopy(teacher), teacher, [photometric_images(4, seed=2)])


def test_a_gn_ws_student_distills_after_calibration():
    # The convs of a GN + WS student standardise their weights; distillation trains the GN
    # affine on what they output, as for GN.
    from test_calibration import _d2_bn_teacher_net

    teacher = _d2_bn_teacher_net()
    x, held_out = photometric_images(32, seed=2), photometric_images(32, seed=4)
    student = convert_norm(copy.deepcopy(teacher), weight_standardization=True)
    calibrate(student, teacher, [x], progress=False)
    calibrated = _output_error(student, teacher, held_out)
    result = distill(student, teacher, [x], steps=40, lr=0.01, batch_size=8, progress=False)
    assert _output_error(student, teacher, held_out) < calibrated
    assert sum(result.losses[-10:]) < sum(result.losses[:10])
