"""docs/worked_example.md, run as written: its gn-det commands, from a folder outside the
checkout, on checkpoints written in detectron2's model-zoo .pkl format where detectron2's
download cache puts them (no network), with a folder of the test's own images.

Each command runs as the document gives it, with ``--num-gpus`` dropped and, appended, what
makes it small: 2 calibration images and 2 distillation steps, 96-pixel images, and for
training one CPU iteration on the 6-image shapes set of ``tiny_env`` (4 classes: the
document's "Your own dataset", predictors re-initialised)."""

import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gn_det
from gn_det.checkpoint.remote import cache_path
from gn_det.cli.config_files import load_config, resolve_config_name

DOC = Path(__file__).resolve().parents[1] / "docs" / "worked_example.md"
GN_DET = str(Path(sys.executable).parent / "gn-det")
SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]
SMALL_TRAINING = [
    "MODEL.DEVICE",
    "cpu",
    "DATASETS.TRAIN",
    "('shapes_tiny_train',)",
    "DATASETS.TEST",
    "('shapes_tiny_val',)",
    "SOLVER.MAX_ITER",
    "1",
    "SOLVER.IMS_PER_BATCH",
    "1",
    "SOLVER.WARMUP_ITERS",
    "1",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    *SMALL_INPUT,
    "DATALOADER.NUM_WORKERS",
    "0",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "50",
    "TEST.DETECTIONS_PER_IMAGE",
    "5",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "4",
]


def _commands(route: str) -> list:
    """The gn-det commands of one route's section, as argument lists."""
    section = DOC.read_text().split("## ")
    text = next(s for s in section if s.startswith(route))
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [
            shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()
        ]
    assert commands and all(c[0] == "gn-det" for c in commands), commands
    return commands


def _small(command: list, images: Path) -> list:
    """The command as the test runs it (module doc)."""
    args = []
    skip = False
    for word in command[1:]:
        if skip:
            skip = False
            continue
        if word == "--num-gpus":
            skip = True
            continue
        args.append(str(images) if word == "my_images" else word)
    if args[0] == "convert":
        flags = [a for a in args if a.startswith("--")]
        assert "--calib-images-dir" in flags
        return [GN_DET, *args, "--calib-images", "2", "--calib-distill-steps", "2", *SMALL_INPUT]
    if args[0] == "train":
        return [GN_DET, *args, *SMALL_TRAINING]
    return [GN_DET, *args]


def _bn_statistics(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if gn_det.NORM_SOURCES.lookup(m) is not None and hasattr(m, "running_var"):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _write_zoo_pkl(url: str, state: dict, author: str, heuristics: bool) -> None:
    path = Path(cache_path(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    model = {
        k: v.detach().numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")
    }
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": author, "matching_heuristics": heuristics}, f)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """detectron2's download cache holding the two checkpoints the document names."""
    from detectron2.modeling import build_model

    folder = tmp_path_factory.mktemp("iopath_cache")
    os.environ["FVCORE_CACHE"] = str(folder)  # cache_path() reads it; restored below
    try:
        cfg = load_config(resolve_config_name("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml"))
        cfg.MODEL.DEVICE = "cpu"
        torch.manual_seed(0)
        syncbn = build_model(cfg)
        _bn_statistics(syncbn)
        _write_zoo_pkl(
            "detectron2://Misc/mask_rcnn_R_50_FPN_3x_syncbn/169527823/model_final_3b3c51.pkl",
            syncbn.state_dict(),
            "Detectron2 Model Zoo",
            False,
        )
        cfg = load_config(resolve_config_name("mask_rcnn_R_50_FPN_bn.yaml"))
        cfg.MODEL.DEVICE = "cpu"
        bn = build_model(cfg)
        _bn_statistics(bn)
        prefix = "backbone.bottom_up."
        backbone = {k[len(prefix) :]: v for k, v in bn.state_dict().items() if k.startswith(prefix)}
        _write_zoo_pkl(
            "detectron2://ImageNetPretrained/torchvision/R-50.pkl", backbone, "torchvision", True
        )
    finally:
        del os.environ["FVCORE_CACHE"]
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("my images")
    g = np.random.default_rng(0)
    for name in ("street/0001.jpg", "street/0002.jpg", "indoor/a.png"):
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(g.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.mark.parametrize("route", ["Route 1", "Route 2"])
def test_the_worked_example_runs_as_written(route, cache, images, tiny_env, tmp_path):
    env = dict(tiny_env, FVCORE_CACHE=str(cache))
    for command in _commands(route):
        run = _small(command, images)
        result = subprocess.run(
            run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, (run, result.stdout[-2000:], result.stderr[-3000:])
        if run[1] == "inspect":
            assert result.stdout.rstrip().endswith("ConvertedGroupNorm       69")
        if run[1] == "convert":
            assert "distill 2 steps" in result.stdout and "keys matched" in result.stdout
            assert "2 images of" in result.stdout and " s on cpu, verified" in result.stdout
            if "R-50.pkl" in " ".join(run):  # a backbone: one line says the heads are not in it
                assert "of the backbone (a backbone checkpoint has no heads" in result.stdout
                assert "not found in the checkpoint" not in result.stderr
            output = tmp_path / run[run.index("--output") + 1]
            assert output.is_file()
        if run[1] == "train":
            out = tmp_path / run[run.index("OUTPUT_DIR") + 1]
            log = (out / "log.txt").read_text()
            assert "ConvertedGroupNorm x" in log and (out / "model_final.pth").is_file()
            weights = run[run.index("MODEL.WEIGHTS") + 1] if "MODEL.WEIGHTS" in run else None
            if weights is not None:  # the converted checkpoint loaded, nothing of it missing
                assert f"Loading {weights}" in log or f"Loading {tmp_path / weights}" in log
