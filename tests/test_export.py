"""Deployment export of a converted model, the way detectron2 exports its native GN model.

detectron2's ``tools/deploy/export_model.py --export-method tracing`` wraps the model in
``detectron2.export.TracingAdapter`` and ``torch.jit.trace``s it (``--format torchscript``) or
hands it to ``torch.onnx.export`` (``--format onnx``). Here the same is done to
``configs/gn_mask_rcnn.yaml``'s model (a BN R-50-FPN Mask R-CNN that gn_det converts to GN on
build), and the exported module is compared with the eager model: on the image it was traced
with, on images of other sizes, after ``torch.jit.save``/``load`` in a process that imports
neither gn_det nor detectron2, and against the trace of detectron2's native
``Misc/mask_rcnn_R_50_FPN_3x_gn.yaml``. See docs/export.md.
"""

import collections
import inspect
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from detectron2 import model_zoo
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from torch import nn

from gn_det import ConvertedGroupNorm, NORM_SOURCES
from gn_det import get_cfg
from gn_det.cli.config_files import load_config, resolve_config_name

TRACE_SIZE = (192, 256)
# Smaller and not a multiple of FPN's size divisibility (32: padded; boxes clipped to 150 x 210);
# larger and portrait. Both differ from the size the trace was made with.
OTHER_SIZES = [(150, 210), (288, 224)]
NUM_NORMS = 69  # R-50 53, FPN 8, 4conv1fc box head 4, mask head 4
ATOL = 1e-4


def _image(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def _small_test_cfg(cfg):
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # Random heads score every class ~1/81: no threshold, so that detections and masks exist.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


def _converted_cfg():
    return _small_test_cfg(load_config(resolve_config_name("gn_mask_rcnn.yaml")))


def _native_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"))
    return _small_test_cfg(cfg)


def inference(model, image):
    # As detectron2's export_model.py and tests/test_export_torchscript.py: no postprocess, so
    # the exported module returns the boxes in input coordinates and the 28x28 ROI masks.
    return model.inference([{"image": image}], do_postprocess=False)[0]


def _trace(model, image):
    adapter = TracingAdapter(model, (image,), inference).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of detectron2's asserts and shape ifs
        # check_trace re-runs and compares inside trace(); the tests compare more, explicitly.
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    return adapter, traced


def _run(adapter, traced, image):
    """The exported module's output on ``image``, as Instances.

    Without the graph executor's profiling and re-optimisation, which cost this test a few
    seconds per new input shape and do not change results; the saved module runs with them in
    the deployment test.
    """
    with torch.no_grad(), torch.jit.optimized_execution(False):
        return adapter.outputs_schema(traced(image))


def _eager(model, image):
    with torch.no_grad():
        return inference(model, image)


def _assert_same_instances(actual, expected, atol=ATOL, rtol=0.0, box_rtol=None):
    assert len(actual) == len(expected)
    # An exported module returns image_size as a tensor.
    assert tuple(int(s) for s in actual.image_size) == tuple(expected.image_size)
    torch.testing.assert_close(
        actual.pred_boxes.tensor,
        expected.pred_boxes.tensor,
        atol=atol,
        rtol=rtol if box_rtol is None else box_rtol,
    )
    torch.testing.assert_close(actual.scores, expected.scores, atol=atol, rtol=rtol)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    torch.testing.assert_close(actual.pred_masks, expected.pred_masks, atol=atol, rtol=rtol)


def _max_abs_diff(actual, expected):
    return {
        "boxes": (actual.pred_boxes.tensor - expected.pred_boxes.tensor).abs().max().item(),
        "scores": (actual.scores - expected.scores).abs().max().item(),
        "masks": (actual.pred_masks - expected.pred_masks).abs().max().item(),
    }


def _aten_ops(traced):
    return collections.Counter(re.findall(r"\b(aten::\w+)\(", str(traced.inlined_graph)))


@pytest.fixture(scope="module")
def converted():
    """gn_mask_rcnn.yaml's model (random GN affine), traced on one image; eager outputs."""
    torch.manual_seed(0)
    model = build_model(_converted_cfg()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.1)
    image = _image(*TRACE_SIZE, seed=0)
    # A score threshold between the 10th and 11th detection of the trace image, so that the
    # trace image has 10 (fewer than DETECTIONS_PER_IMAGE) and other images another number:
    # the exported module then has to reproduce a data-dependent number of detections.
    scores = _eager(model, image).scores
    model.roi_heads.box_predictor.test_score_thresh = float(scores[9] + scores[10]) / 2
    expected = _eager(model, image)
    adapter, traced = _trace(model, image)
    others = [_image(h, w, seed=i + 1) for i, (h, w) in enumerate(OTHER_SIZES)]
    return {
        "model": model,
        "adapter": adapter,
        "traced": traced,
        "image": image,
        "expected": expected,
        "others": others,
        "others_expected": [_eager(model, im) for im in others],
    }


def test_converted_model_traces_to_group_norm(converted):
    model, traced = converted["model"], converted["traced"]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == NUM_NORMS and all(type(m) is ConvertedGroupNorm for m in norms)
    assert not any(NORM_SOURCES.lookup(m) is not None for m in model.modules())
    ops = _aten_ops(traced)
    assert ops["aten::group_norm"] == NUM_NORMS
    assert ops["aten::batch_norm"] == 0
    assert ops["aten::_convolution"] + ops["aten::conv2d"] > 0


def test_traced_converted_model_matches_eager(converted):
    expected = converted["expected"]
    assert len(expected) == 10  # detections and their masks exist (see the fixture)
    actual = _run(converted["adapter"], converted["traced"], converted["image"])
    _assert_same_instances(actual, expected)


@pytest.mark.parametrize("index", range(len(OTHER_SIZES)), ids=[f"{h}x{w}" for h, w in OTHER_SIZES])
def test_trace_runs_on_other_image_sizes(converted, index):
    # detectron2's R-CNN traces are shape-generic (its tests trace on a smaller image than they
    # run), including the number of detections that pass the score threshold.
    image, expected = converted["others"][index], converted["others_expected"][index]
    actual = _run(converted["adapter"], converted["traced"], image)
    assert actual.image_size.tolist() == list(image.shape[-2:])
    _assert_same_instances(actual, expected)


def test_other_images_exercise_a_different_number_of_detections(converted):
    # Precondition of the size test above: not every image gives the trace image's count.
    counts = [len(e) for e in converted["others_expected"]]
    assert any(n != len(converted["expected"]) for n in counts), counts


_DEPLOY_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torchvision  # noqa: F401  (registers torchvision::nms and roi_align)

    module_path, inputs_path, outputs_path = sys.argv[1:]
    module = torch.jit.load(module_path)
    with torch.no_grad():
        outputs = [list(module(image)) for image in torch.load(inputs_path)]
    leaked = sorted({k.split(".")[0] for k in sys.modules} & {"gn_det", "detectron2"})
    torch.save({"outputs": outputs, "leaked": leaked}, outputs_path)
    """
)


@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
def test_saved_trace_runs_without_gn_det_or_detectron2(converted, tmp_path):
    # The deployment side of export_model.py's model.ts: torch.jit.load, default graph executor.
    torch.jit.save(converted["traced"], str(tmp_path / "model.ts"))
    torch.save(converted["others"][:1], tmp_path / "inputs.pt")  # not the trace image's size
    proc = subprocess.run(
        [sys.executable, "-c", _DEPLOY_SCRIPT, "model.ts", "inputs.pt", "outputs.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "outputs.pt", weights_only=True)
    assert result["leaked"] == []
    (flat,) = result["outputs"]
    actual = converted["adapter"].outputs_schema(flat)
    _assert_same_instances(actual, converted["others_expected"][0])


def test_converted_and_native_gn_models_trace_to_the_same_graph(converted):
    torch.manual_seed(0)
    native = build_model(_native_cfg()).eval()
    assert not any(isinstance(m, ConvertedGroupNorm) for m in native.modules())
    _, traced = _trace(native, converted["image"])
    native_ops = _aten_ops(traced)
    assert native_ops["aten::group_norm"] == NUM_NORMS
    assert native_ops == _aten_ops(converted["traced"])


# torch.onnx.export's `dynamo` argument exists from torch 2.5 on; before, export() is the
# TorchScript-based exporter anyway.
_TORCHSCRIPT_EXPORTER = (
    {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
)


def test_onnx_export_matches_eager(converted, tmp_path):
    # Not in requirements/base.txt: torch.onnx.export needs `onnx` (its default dynamo exporter
    # also `onnxscript`), and comparing outputs needs `onnxruntime`.
    onnx = pytest.importorskip(
        "onnx", reason="ONNX export needs the `onnx` package (not a gn_det dependency)"
    )
    ort = pytest.importorskip(
        "onnxruntime", reason="comparing ONNX outputs needs `onnxruntime` (not a gn_det dependency)"
    )
    adapter, image = converted["adapter"], converted["image"]
    path = tmp_path / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter, as detectron2's export_model.py (written for it).
        # Opset >= 16: ROIAlignV2 is aligned=True, which torchvision exports only from 16 on
        # (at detectron2's STABLE_ONNX_OPSET_VERSION 11 it exports, warns, and is wrong).
        torch.onnx.export(
            adapter,
            (image,),
            str(path),
            opset_version=17,
            **_TORCHSCRIPT_EXPORTER,
            input_names=["image"],
            dynamic_axes={"image": {1: "height", 2: "width"}},
        )
    graph_ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    # torch's TorchScript-based exporter writes group_norm as Reshape + InstanceNormalization +
    # Reshape + Mul/Add (opsets 16, 17 and 18 alike).
    assert graph_ops["InstanceNormalization"] == NUM_NORMS
    assert graph_ops["BatchNormalization"] == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = [(image, converted["expected"])] + list(
        zip(converted["others"], converted["others_expected"])
    )
    for im, expected in cases:
        flat = session.run(None, {"image": im.numpy()})
        actual = adapter.outputs_schema([torch.from_numpy(x) for x in flat])
        # Other kernels than eager's: box coordinates (pixels, in the hundreds) get a relative
        # tolerance too; measured: boxes <= 6.1e-5, scores and masks <= 1e-7 absolute.
        _assert_same_instances(actual, expected, box_rtol=1e-5)


def test_a_gn_ws_model_traces_and_exports_to_onnx(tmp_path):
    """GN + Weight Standardization (``shapes/gn_ws.yaml``, R-18-FPN): the trace records the
    standardisation of each conv's raw weight, and TorchScript and ONNX compute what eager does."""
    ort = pytest.importorskip("onnxruntime", reason="comparing ONNX outputs needs onnxruntime")
    from gn_det import WSConv2d

    torch.manual_seed(0)
    model = build_model(_small_test_cfg(load_config(resolve_config_name("shapes/gn_ws.yaml"))))
    model.eval()
    num_ws = sum(isinstance(m, WSConv2d) for m in model.modules())
    assert num_ws == 32
    image = _image(128, 160, seed=0)
    expected = _eager(model, image)
    assert len(expected) > 0
    adapter, traced = _trace(model, image)
    # Each conv's weight is standardised in the graph, from the parameter (not a constant).
    assert _aten_ops(traced)["aten::var_mean"] == num_ws
    _assert_same_instances(_run(adapter, traced, image), expected)
    path = tmp_path / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(adapter, (image,), str(path), opset_version=17,
                          **_TORCHSCRIPT_EXPORTER, input_names=["image"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = session.run(None, {"image": image.numpy()})
    actual = adapter.outputs_schema([torch.from_numpy(x) for x in flat])
    _assert_same_instances(actual, expected, box_rtol=1e-5)
