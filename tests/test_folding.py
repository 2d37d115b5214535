"""gn_det.folding: GroupNorm folded into the convolutions for inference."""

import copy
import re

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from gn_det.cli.config_files import load_config, resolve_config_name
from gn_det.folding import (
    ChannelAffine,
    fold_for_inference,
    group_statistics,
)
from models import gn_folding_net


def test_a_group_norm_whose_statistics_do_not_change_folds_exactly():
    """The same image every time: its group statistics are the population's, so the fixed
    affine is GN itself, and folded into the convolutions it still is."""
    net = gn_folding_net()
    x = torch.rand(1, 3, 12, 12) * 4 - 1
    folded, report = fold_for_inference(net, torch.cat([x, x, x]), distill_steps=0)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    assert [what for _, _, what in report.rows] == [
        "folded into the conv",
        "folded into the conv",
        "affine (no conv before it)",
    ]
    assert report.statistics == "3 images"
    assert not any(isinstance(m, nn.GroupNorm) for m in folded.modules())
    assert (
        folded[0].norm is None
        and folded[0].bias is not None
        and isinstance(folded[3], ChannelAffine)
    )
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())  # the input model is untouched


def _unfused(net, stats):
    """The reference: each GroupNorm replaced by GN's formula with fixed group statistics."""
    unfused = copy.deepcopy(net)
    for name, (mean, variance) in stats.items():
        gn = unfused.get_submodule(name)
        per_group = gn.num_channels // gn.num_groups
        scale = gn.weight / (variance.float().repeat_interleave(per_group) + gn.eps).sqrt()
        bias = gn.bias - scale * mean.float().repeat_interleave(per_group)
        affine = ChannelAffine(gn.num_channels, scale, bias)
        parent, _, child = name.rpartition(".")
        setattr(unfused.get_submodule(parent) if parent else unfused, child, affine)
    return unfused


def test_folding_into_the_conv_equals_the_unfused_affine_and_the_statistics_are_pooled():
    net = gn_folding_net()
    images = torch.rand(5, 3, 12, 12) * torch.rand(5, 1, 1, 1) * 3  # images differ in contrast
    layers = {n: m for n, m in net.named_modules() if isinstance(m, nn.GroupNorm)}
    stats = group_statistics(net, images, layers)
    fused, report = fold_for_inference(net, images, distill_steps=0)
    assert [what for _, _, what in report.rows] == [
        "folded into the conv",
        "folded into the conv",
        "affine (no conv before it)",
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            fused(images), _unfused(net, stats)(images), rtol=1e-4, atol=1e-5
        )
    assert fused[0].norm is None and isinstance(fused[3], ChannelAffine)
    # The statistics are those of the layer's input over every pixel of every image.
    mean, variance = stats["0.norm"]
    with torch.no_grad():
        inputs = nn.functional.conv2d(images, net[0].weight, padding=1)
    grouped = inputs.reshape(5, 4, -1).transpose(0, 1).reshape(4, -1).double()
    torch.testing.assert_close(mean, grouped.mean(1))
    torch.testing.assert_close(variance, grouped.var(1, unbiased=False))


def test_data_free_folding_is_gns_affine_and_says_so(gn_det_logs):
    net = gn_folding_net()
    folded, report = fold_for_inference(net, None)
    assert report.statistics == "data-free (mean 0, variance 1)" and report.distillation is None
    scale = net[0].norm.weight / (1 + 1e-5) ** 0.5
    torch.testing.assert_close(folded[0].weight, net[0].weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded[0].bias, net[0].norm.bias)
    assert "without images" in gn_det_logs.text


def test_partial_plans_touch_only_what_they_name():
    net = gn_folding_net()
    images = torch.rand(3, 3, 12, 12)
    folded, report = fold_for_inference(net, images, exclude=["1"], distill_steps=0)
    assert (
        isinstance(folded[1].norm, nn.GroupNorm)
        and folded[0].norm is None
        and isinstance(folded[3], ChannelAffine)
    )
    assert ("1.norm", "GroupNorm", "kept as GN") in report.rows
    torch.testing.assert_close(
        folded[1].weight, net[1].weight
    )  # an excluded layer's conv is not changed
    folded, _ = fold_for_inference(net, images, include=["0"], distill_steps=0)
    assert (
        folded[0].norm is None
        and isinstance(folded[1].norm, nn.GroupNorm)
        and isinstance(folded[3], nn.GroupNorm)
    )
    with pytest.raises(ValueError, match="no GroupNorm layer"):
        fold_for_inference(net, images, include=["nothing.here"])
    with pytest.raises(ValueError, match="no GroupNorm layer"):
        fold_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), images)
    with pytest.raises(ValueError, match="distill_steps"):
        fold_for_inference(net, images, distill_steps=-1)


def test_distillation_trains_the_affines_towards_the_gn_model():
    net = gn_folding_net()
    g = torch.Generator().manual_seed(1)
    images = (
        torch.rand(8, 3, 12, 12, generator=g) * torch.rand(8, 1, 1, 1, generator=g) * 4
    )  # own contrast each
    plain, _ = fold_for_inference(net, images, distill_steps=0)
    distilled, report = fold_for_inference(
        net, images, distill_steps=30, batch_size=4, progress=False
    )
    assert len(report.distillation.losses) == 30

    def error(model):
        with torch.no_grad():
            return ((model(images) - net(images)).pow(2).sum() / net(images).pow(2).sum()).item()

    assert error(distilled) < error(plain)


def _shapes_gn(folded=False, exclude=()):
    cfg = load_config(resolve_config_name("shapes/gn.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.NORM_CONVERSION.FOLDED",
            str(folded),
            "MODEL.NORM_CONVERSION.FOLDED_EXCLUDE",
            str(list(exclude)),
            "INPUT.MIN_SIZE_TEST",
            "64",
            "INPUT.MAX_SIZE_TEST",
            "64",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "0.0",
        ]
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def test_a_folded_detector_matches_the_architecture_its_config_builds():
    """MODEL.NORM_CONVERSION.FOLDED builds what folding leaves: the folded state loads into it
    strictly, and the model has no GroupNorm outside FOLDED_EXCLUDE."""
    _, gn = _shapes_gn()
    images = [{"image": torch.rand(3, 64, 64) * 255} for _ in range(2)]
    for exclude in ((), ("roi_heads",)):
        folded, _ = fold_for_inference(gn, images, exclude=exclude, distill_steps=0)
        _, built = _shapes_gn(folded=True, exclude=exclude)
        built.load_state_dict(folded.state_dict(), strict=True)
        norms = [n for n, m in built.named_modules() if isinstance(m, nn.GroupNorm)]
        assert all(n.startswith("roi_heads") for n in norms) and bool(norms) == bool(exclude)
        with torch.no_grad():
            a, b = built(images[:1])[0]["instances"], folded(images[:1])[0]["instances"]
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_the_folded_detector_traces_and_runs_in_onnxruntime():
    import io
    import warnings

    import onnxruntime
    from detectron2.export import TracingAdapter

    _, gn = _shapes_gn()
    image = torch.rand(3, 64, 64) * 255
    folded, _ = fold_for_inference(gn, [{"image": image}], distill_steps=0)

    def inference(model, x):
        return model.inference([{"image": x}], do_postprocess=False)[0]

    adapter = TracingAdapter(folded, (image,), inference).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
        assert "group_norm" not in str(traced.inlined_graph)
        torch.onnx.export(adapter, (image,), buffer, opset_version=16, dynamo=False)
        eager = adapter(image)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    assert len(outputs) == len(eager)
    for ours, theirs in zip(eager, outputs):
        torch.testing.assert_close(torch.as_tensor(theirs), ours, rtol=1e-3, atol=1e-3)
    import onnx

    assert not [
        n.op_type
        for n in onnx.load_from_string(buffer.getvalue()).graph.node
        if "Normalization" in n.op_type
    ]


def test_a_folded_checkpoint_records_its_fold_plan_and_loads_only_into_that_structure(
    tmp_path, capsys
):
    """gn-det convert --to folded records FOLDED_EXCLUDE in the checkpoint (pth and safetensors;
    pkl keeps no metadata and is refused); a model built with other FOLDED / FOLDED_EXCLUDE
    refuses it in one line instead of loading what fits, and a folded model refuses a checkpoint
    that is not folded. A folded model's own checkpoints (resuming) carry its plan."""
    from gn_det.checkpoint import Checkpointer
    from gn_det.checkpoint.io import CheckpointError
    from gn_det.cli import main

    _, gn = _shapes_gn()
    source = tmp_path / "gn.pth"
    torch.save({"model": gn.state_dict()}, source)

    def convert(output):
        return main(["convert", "--to", "folded", "--config", "shapes/gn.yaml", "--weights",
                     str(source), "--output", str(output), "--fold-exclude", "roi_heads",
                     "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                     "DATASETS.TRAIN", "('coco_2017_train',)"])  # data-free: no images here

    assert convert(tmp_path / "folded.pkl") == 2
    assert "written as pth or safetensors" in capsys.readouterr().err
    plan = "MODEL.NORM_CONVERSION.FOLDED True FOLDED_EXCLUDE ['roi_heads']"
    for name in ("folded.pth", "folded.safetensors"):
        assert convert(tmp_path / name) == 0
        _, fits = _shapes_gn(folded=True, exclude=["roi_heads"])
        assert Checkpointer(fits).load_weights(str(tmp_path / name)).missing_keys == []
        for folded, built in ((True, "FOLDED True FOLDED_EXCLUDE []"), (False, "FOLDED False")):
            _, model = _shapes_gn(folded=folded)
            message = f"written for {plan}, but the model is built with " \
                f"MODEL.NORM_CONVERSION.{built}; load it"
            with pytest.raises(CheckpointError, match=re.escape(message)):
                Checkpointer(model).load_weights(str(tmp_path / name))
    with pytest.raises(CheckpointError, match=r"written for MODEL.NORM_CONVERSION.FOLDED False"):
        Checkpointer(fits).load_weights(str(source))
    Checkpointer(fits, save_dir=str(tmp_path)).save("resumable")
    Checkpointer(fits).load_weights(str(tmp_path / "resumable.pth"))
