"""tools/visualize.py (gn_det/visualize.py), run in-process on a random-init model and a
128x128 shapes set made here."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


REPO = Path(__file__).resolve().parent.parent


def _tool(name):
    """The ``main`` of tools/<name>.py, loaded as the script is (a thin shell over gn_det)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ---------------------------------------------------------------------------------------------
# visualize
# ---------------------------------------------------------------------------------------------

IMAGE_SIZE = 128


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny shapes dataset (2 + 2 images of 128x128) and random-init weights of shapes/gn.yaml,
    saved as a run's OUTPUT_DIR would hold them."""
    from detectron2.modeling import build_model

    from gn_det.cli.config_files import load_config, resolve_config_name
    from gn_det.data import register_shapes

    root = tmp_path_factory.mktemp("vis")
    register_shapes(
        "shapes_vis",
        cache_dir=root / "cache",
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        num_train=2,
        num_val=2,
    )
    cfg = load_config(resolve_config_name("shapes/gn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    run = root / "run"
    run.mkdir()
    weights = run / "model_final.pth"
    torch.save({"model": model.state_dict()}, weights)
    return {"weights": weights, "state": model.state_dict(), "root": root}


def _visualize_argv(weights, *extra):
    return [
        "--config",
        "shapes/gn.yaml",
        "--weights",
        str(weights),
        "--dataset",
        "shapes_vis_val",
        "--num-images",
        "2",
        "--score-threshold",
        "0.05",
        *extra,
    ]


def test_visualize_draws_ground_truth_beside_prediction(tiny_run, capsys):
    pytest.importorskip("cv2", reason="detectron2's Visualizer needs OpenCV")
    main = _tool("visualize")
    assert main(_visualize_argv(tiny_run["weights"])) == 0
    folder = tiny_run["weights"].parent / "visualize"  # the default: beside the weights
    written = sorted(folder.iterdir())
    assert [p.name for p in written] == ["shapes_vis_val_000000.png", "shapes_vis_val_000001.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            pixels = np.asarray(image.convert("RGB"))
        assert width == 2 * IMAGE_SIZE  # ground truth | prediction
        assert IMAGE_SIZE < height <= IMAGE_SIZE + 40  # plus a title bar
        assert pixels.std() > 10
    assert str(written[0]) in capsys.readouterr().out

    # Again: existing files are kept (exit 2, one line naming the file) unless --force.
    before = written[0].read_bytes()
    assert main(_visualize_argv(tiny_run["weights"])) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert written[0].read_bytes() == before
    out = tiny_run["root"] / "out"
    assert (
        main(
            _visualize_argv(
                tiny_run["weights"], "--num-images", "1", "--scale", "2", "--output-dir", str(out)
            )
        )
        == 0
    )
    [path] = out.iterdir()
    with Image.open(path) as image:
        assert image.size[0] == 2 * 2 * IMAGE_SIZE


def test_visualize_refuses_weights_that_do_not_fit(tiny_run, tmp_path, capsys):
    pytest.importorskip("cv2", reason="without OpenCV the tool stops before loading weights")
    state = {k: v for k, v in tiny_run["state"].items() if not k.startswith("roi_heads.mask_head")}
    weights = tmp_path / "partial.pth"
    torch.save({"model": state}, weights)
    assert _tool("visualize")(_visualize_argv(weights, "--output-dir", str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err
    assert "does not fit the config's model" in err and "mask_head" in err
    assert not (tmp_path / "out").exists()


def test_visualize_without_opencv_says_what_to_install(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails, installed or not
    monkeypatch.delitem(sys.modules, "detectron2.utils.visualizer", raising=False)
    argv = _visualize_argv(tiny_run["weights"], "--output-dir", str(tmp_path))
    assert _tool("visualize")(argv) == 2
    assert "opencv-python-headless" in capsys.readouterr().err


def test_visualize_usage_errors(tmp_path, capsys):
    main = _tool("visualize")
    with pytest.raises(SystemExit):
        main(["--weights", "x.pth", "--num-images", "0"])
    # No config given and none beside the weights.
    assert main(["--weights", str(tmp_path / "model_final.pth")]) == 2
    assert "config.yaml" in capsys.readouterr().err
