"""The route a new detectron2 user walks (issue 31), from a folder outside the checkout:
detectron2's model-zoo Mask R-CNN and RetinaNet configs inspected and converted from
random-weight stand-ins of their checkpoints (no network), calibration and distillation on a
folder holding a photograph (matplotlib's sample of Grace Hopper) in several image modes among
a truncated JPEG and a text file; every bad input one line, exit 2, nothing written. Small
images (64 px) and one distillation step keep it cheap."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image, ImageOps

from gn_det.cli import main

MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    """A folder with stand-in checkpoints of both configs and a folder of images."""
    from detectron2.modeling import build_model

    from gn_det.cli.config_files import load_config, resolve_config_name

    folder = tmp_path_factory.mktemp("user")
    for name, file in ((MASK_RCNN, "mask_rcnn.pth"), (RETINANET, "retinanet.pth")):
        cfg = load_config(resolve_config_name(name))
        cfg.MODEL.DEVICE = "cpu"
        torch.save({"model": build_model(cfg).state_dict()}, folder / file)
    photos = folder / "photos"
    photos.mkdir()
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    photo.save(photos / "hopper.jpg")
    ImageOps.mirror(photo).save(photos / "hopper_mirrored.jpg")
    photo.convert("L").save(photos / "hopper_gray.png")
    photo.convert("RGBA").save(photos / "hopper_rgba.png")
    deep = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(photos / "hopper_16bit.png")
    jpeg = (photos / "hopper.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (photos / "text.jpg").write_text("a caption, not an image\n")
    (photos / "notes.txt").write_text("taken in 1960\n")
    return folder


def _files(folder):
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_model_zoo_configs_inspect_and_convert_on_a_folder_of_photographs(
    route, capsys, gn_det_logs, monkeypatch
):
    monkeypatch.chdir(route)
    assert main(["inspect", "--config", MASK_RCNN, "MODEL.NORM_CONVERSION.ENABLED", "True"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ConvertedGroupNorm       53")
    assert main(["inspect", "--config", RETINANET]) == 0  # model zoo: no --allow-unsafe-yaml
    assert capsys.readouterr().err == ""

    # Mask R-CNN: FrozenBN, so calibrated (distillation trains no frozen layer, and says so).
    calibrate = ["convert", "--config", MASK_RCNN, "--weights", "mask_rcnn.pth", "--output",
                 "mask_rcnn_gn.pth", "--calib-images-dir", "photos", "--calib-images", "8"]
    assert main([*calibrate, "--transfer", "distill", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no trainable layers converted" in err
    gn_det_logs.clear()
    assert main([*calibrate, "--transfer", "calibrate", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "--transfer calibrate: 5 images of photos (--calib-images 8: no more readable" in out
    assert "s on cpu, verified" in out and "transfer: stats + calibrate" in out
    skipped = [r.getMessage() for r in gn_det_logs.records if "unreadable" in r.getMessage()]
    assert len(skipped) == 1 and "truncated.jpg" in skipped[0] and "text.jpg" in skipped[0]
    state = torch.load("mask_rcnn_gn.pth", weights_only=True)["model"]
    assert {t.device.type for t in state.values()} == {"cpu"}

    # RetinaNet, as a user's BN variant of the model-zoo config: distilled on the photographs.
    assert main(["convert", "--config", RETINANET, "--weights", "retinanet.pth", "--output",
                 "retinanet_gn.pth", "--transfer", "distill", "--calib-images-dir", "photos",
                 "--calib-distill-steps", "1", "MODEL.RESNETS.NORM", "BN", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "--transfer distill: 5 images of photos" in out and "distill 1 steps" in out
    assert Path("retinanet_gn.pth").is_file()


def test_every_bad_input_is_one_line_and_exit_2_with_nothing_written(
    route, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(route)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (route / "empty").mkdir(exist_ok=True)
    (route / "bad_photos").mkdir(exist_ok=True)
    (route / "bad_photos" / "text.jpg").write_text("not an image")
    (route / "weights.txt").write_text("model_final.pth\n")
    (route / "truncated.pth").write_bytes((route / "mask_rcnn.pth").read_bytes()[:4096])
    existing = route / "existing.pth"
    existing.write_bytes(b"an earlier output")
    convert = ["convert", "--config", MASK_RCNN, "--weights", "mask_rcnn.pth"]
    cases = {
        "text checkpoint": ["convert", "--weights", "weights.txt", "--output", "o.pth"],
        "truncated checkpoint": ["convert", "--weights", "truncated.pth", "--output", "o.pth"],
        "an image as checkpoint": ["convert", "--weights", "photos/hopper.jpg", "--output", "o"],
        "output is a folder": [*convert, "--output", "empty", "--force"],
        "empty verify folder": [*convert, "--output", str(existing), "--force",
                                "--verify-images", "2", "--verify-images-dir", "empty"],
        "no readable image": [*convert, "--output", "o.pth", "--transfer", "calibrate",
                              "--calib-images-dir", "bad_photos"],
        "cuda without a GPU": [*convert, "--output", "o.pth", "--device", "cuda"],
        "inspect a text checkpoint": ["inspect", "--weights", "weights.txt"],
    }
    before = _files(route)
    for case, argv in cases.items():
        assert main([*argv, *SMALL] if argv[0] == "convert" else argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert _files(route) == before


def test_the_installed_command_from_outside_the_checkout(tmp_path):
    gn_det = Path(sys.executable).parent / "gn-det"
    result = subprocess.run([str(gn_det), "inspect", "--config", RETINANET], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "FrozenBatchNorm2d       53" in result.stdout
    assert "unsafe" not in result.stderr
