"""tools/train_net.py end to end on the embedded dataset (tiny runs), and its loaders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import gn_det
from gn_det.checkpoint import Checkpointer
from gn_det.config import load_config, resolve_config_name
from gn_det.data import register_shapes
from reference import stats_transfer_reference

REPO = Path(__file__).resolve().parent.parent
TRAIN_NET = REPO / "tools" / "train_net.py"
TINY = ["DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST", "('shapes_tiny_val',)",
        "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0"]


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    """Environment in which a fresh process registers a 6-image shapes set (via sitecustomize)."""
    cache = tmp_path_factory.mktemp("cache")
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(
        "from gn_det.data import register_shapes\n"
        f"register_shapes('shapes_tiny', cache_dir={str(cache)!r}, image_size=(128, 128), num_train=4, num_val=2)\n"
    )
    register_shapes("shapes_tiny", cache_dir=cache, image_size=(128, 128), num_train=4, num_val=2)
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("LOCAL_RANK", None)
    return env


def _train_net(args, env, cwd):
    return subprocess.run([sys.executable, str(TRAIN_NET), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _metrics(output_dir):
    lines = (Path(output_dir) / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("variant", ["frozenbn", "bn", "gn"])
def test_two_iterations_of_each_shapes_config(variant, tiny_env, tmp_path):
    out = tmp_path / "out"
    result = _train_net(["--config", f"shapes/{variant}.yaml", *TINY, "OUTPUT_DIR", str(out)],
                        tiny_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Norm layers:" in log
    if variant == "gn":
        assert "ConvertedGroupNorm x" in log and "BatchNorm" not in log.split("Norm layers:")[1].splitlines()[0]
    if variant == "bn":
        assert "BatchNorm layers train on batch statistics of 2 image(s)" in log
        assert "MODEL.NORM_CONVERSION.ENABLED True" in log
    metrics = _metrics(out)
    assert any("total_loss" in m for m in metrics)
    assert any("bbox/AP" in m for m in metrics)  # COCO evaluation ran (segm too, given predictions)
    assert (out / "model_final.pth").is_file()


def test_two_cpu_processes_with_num_gpus_2(tiny_env, tmp_path):
    out = tmp_path / "out"
    result = _train_net(["--config", "shapes/gn.yaml", "--num-gpus", "2", *TINY,
                         "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(out)], tiny_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert (out / "log.txt.rank1").is_file()
    assert any("bbox/AP" in m for m in _metrics(out))


def test_unsafe_yaml_is_refused_with_a_clear_message(tiny_env, tmp_path):
    config = tmp_path / "unsafe.yaml"
    config.write_text('MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: !!python/object/apply:eval ["[[32]]"]\n')
    result = _train_net(["--config-file", str(config), "--eval-only"], tiny_env, cwd=tmp_path)
    assert result.returncode != 0
    assert "needs unsafe YAML" in result.stderr and "--allow-unsafe-yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_config_name_lists_the_available_ones(tiny_env, tmp_path):
    result = _train_net(["--config", "gn_mask_rnn.yaml"], tiny_env, cwd=tmp_path)
    assert result.returncode != 0 and "Available:" in result.stderr and "gn_mask_rcnn.yaml" in result.stderr


def test_torchvision_imagenet_weights_load_into_the_converted_torchvision_backbone(tmp_path):
    cfg = load_config(resolve_config_name("gn_mask_rcnn_torchvision_R_50.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    from detectron2.modeling import build_model

    model = build_model(cfg)
    assert not [m for m in model.modules() if gn_det.NORM_CONVERTERS.lookup(m) is not None]
    resnet = torchvision.models.resnet50()
    with torch.no_grad():
        bn = resnet.layer3[1].bn2
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")  # torchvision's format, as is
    incompatible = Checkpointer(model).load(str(tmp_path / "resnet50.pth"))
    assert incompatible is not None
    gn = model.backbone.bottom_up.layer3[1].bn2
    expected_w, expected_b = stats_transfer_reference(
        bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, num_groups=32, eps=1e-5
    )
    torch.testing.assert_close(gn.weight.detach().double(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn.bias.detach().double(), expected_b, rtol=1e-5, atol=1e-6)
