"""LazyConfig: detectron2's new_baselines models converted by config alone, and training one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.model_zoo import get_config

import gn_det
from gn_det.cli.config_files import CONFIGS_DIR
from gn_det.lazy import with_norm_conversion

REPO = Path(__file__).resolve().parent.parent
# One of each distinct model of detectron2's new_baselines (the epoch variants share a model).
NEW_BASELINES = [
    "mask_rcnn_R_50_FPN_100ep_LSJ.py",
    "mask_rcnn_R_101_FPN_100ep_LSJ.py",
    "mask_rcnn_regnetx_4gf_dds_FPN_100ep_LSJ.py",
    "mask_rcnn_regnety_4gf_dds_FPN_100ep_LSJ.py",
]


def _bn_family(model):
    return [n for n, m in model.named_modules() if gn_det.NORM_SOURCES.lookup(m) is not None]


@pytest.mark.parametrize("name", NEW_BASELINES)
def test_every_new_baselines_model_converts_and_runs(name):
    base = get_config(f"new_baselines/{name}")
    torch.manual_seed(0)
    model = instantiate(with_norm_conversion(base.model, target="GN")).eval()
    assert not _bn_family(model)
    groups = {
        m.num_channels: m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)
    }
    for channels, g in groups.items():  # 32 where it divides, else the largest divisor below
        expected = max(d for d in range(1, 33) if channels % d == 0)
        assert g == expected, (channels, g)
    with torch.no_grad():
        (result,) = model([{"image": torch.rand(3, 64, 96) * 255}])
    assert "instances" in result


def test_regnet_widths_use_the_fallback():
    model = instantiate(
        LazyConfig.load(
            str(CONFIGS_DIR / "lazy/mask_rcnn_regnetx_4gf_dds_FPN_100ep_LSJ_gn.py")
        ).model
    )
    widths = {
        m.num_channels: m.num_groups
        for m in model.backbone.bottom_up.modules()
        if isinstance(m, torch.nn.GroupNorm)
    }
    assert widths[80] == 20 and widths[240] == 30 and widths[560] == 28 and widths[1360] == 20


def _comparable(node):
    """A config subtree as plain data; callables by name (each load makes new lambdas)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        return {k: _comparable(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_comparable(v) for v in node]
    if callable(node):
        return f"{getattr(node, '__module__', '')}.{getattr(node, '__qualname__', repr(node))}"
    return node


def test_our_lazy_configs_change_only_the_norm():
    ours = LazyConfig.load(str(CONFIGS_DIR / "lazy/mask_rcnn_R_50_FPN_100ep_LSJ_gn.py"))
    base = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
    assert _comparable(ours.model.model) == _comparable(base.model)
    assert _comparable(ours.model)["target"] == "GN"
    for key in ("dataloader", "optimizer", "lr_multiplier", "train"):
        assert _comparable(ours[key]) == _comparable(base[key]), key
    highres = LazyConfig.load(str(CONFIGS_DIR / "lazy/mask_rcnn_R_50_FPN_LSJ_gn_highres.py"))
    assert highres.dataloader.train.total_batch_size == 16 and highres.model.recompute


def test_bad_options_fail_when_the_config_loads():
    base = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
    with pytest.raises(ValueError, match="valid targets"):
        with_norm_conversion(base.model, target="LayerNorm")


def test_two_iterations_of_the_shapes_lazy_config(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "from gn_det.data import register_shapes\n"
        f"register_shapes('shapes_lazy', cache_dir={str(tmp_path / 'cache')!r}, "
        "image_size=(128, 128), num_train=4, num_val=2)\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_net.py"),
            "--config",
            "lazy/shapes_gn.py",
            "train.max_iter=2",
            f"train.output_dir={out}",
            "dataloader.train.dataset.names=shapes_lazy_train",
            "dataloader.test.dataset.names=shapes_lazy_val",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            # AMP as detectron2's new baselines set it: bfloat16 autocast (or float32) on CPU.
            "train.amp.enabled=True",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Norm layers: ConvertedGroupNorm x31" in log
    assert (out / "model_final.pth").is_file() and (out / "metrics.json").is_file()


def test_missing_coco_files_are_a_clear_error_for_lazy_configs(tmp_path):
    import os

    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_net.py"),
            "--config",
            "lazy/mask_rcnn_R_50_FPN_100ep_LSJ_gn.py",
            f"train.output_dir={tmp_path / 'out'}",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert (
        str(tmp_path / "datasets" / "coco") in result.stderr
        and "DETECTRON2_DATASETS" in result.stderr
    )
