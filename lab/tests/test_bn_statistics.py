"""gn_det_lab.bn_statistics: a finished BN run evaluated with running, precise and
per-image batch statistics (lab/tools/bn_statistics_study.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gn_det_lab.bn_statistics import bn_layers, evaluate_bn_modes, load_run, with_statistics

from models import TINY

pytestmark = pytest.mark.study  # each worker trains its own BN run (make lab-test)


@pytest.fixture(scope="module")
def bn_run(tiny_env, tmp_path_factory):
    """A 2-iteration BN run on shapes_tiny, evaluated on shapes_tiny_val by its own process."""
    from gn_det_lab.runs import train_run

    run_dir = tmp_path_factory.mktemp("bn_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(
            "PYTHONPATH", tiny_env["PYTHONPATH"]
        )  # the child process registers shapes_tiny
        # Every detection kept, so that the untrained model has some to evaluate.
        record = train_run(
            "shapes/bn.yaml",
            [*TINY, "SOLVER.IMS_PER_BATCH", "2", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"],
            run_dir,
            threads=1,
            datasets=["shapes_tiny_val"],
        )
    assert record["returncode"] == 0, (run_dir / "stdout.txt").read_text()[-2000:]
    return run_dir, record


def test_running_statistics_reproduce_the_runs_own_evaluation(bn_run):
    run_dir, record = bn_run
    found = evaluate_bn_modes(run_dir, modes=["running", "batch"])
    assert set(found) == {"running", "batch"} and set(found["running"]) == {"shapes_tiny_val"}
    assert found["running"]["shapes_tiny_val"] == (record["box_ap"], record["mask_ap"])


def _detections(model, image):
    with torch.no_grad():
        return model([{"image": image}])[0]["instances"]


def test_running_mode_detects_what_the_trained_model_detects(bn_run):
    # The AP equality above compares an untrained model's 0 with 0; this compares what it detects.
    _, trained = load_run(bn_run[0])
    image = torch.rand(3, 128, 128) * 255
    expected = _detections(trained.eval(), image)
    found = _detections(with_statistics(trained, "running"), image)
    assert len(expected) > 0
    torch.testing.assert_close(found.scores, expected.scores)
    torch.testing.assert_close(found.pred_boxes.tensor, expected.pred_boxes.tensor)
    torch.testing.assert_close(found.pred_masks, expected.pred_masks)
    per_image = _detections(with_statistics(trained, "batch"), image)
    assert len(per_image) != len(expected) or not torch.allclose(per_image.scores, expected.scores)


def _layer_input(model, layer, image):
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model([{"image": image}])
    handle.remove()
    return seen[0]


def test_batch_mode_normalises_each_image_with_its_own_statistics(bn_run):
    _, trained = load_run(bn_run[0])
    model = with_statistics(trained, "batch")
    assert not model.training and len(bn_layers(model)) == len(bn_layers(trained)) > 10
    stem, trained_stem = bn_layers(model)[0], bn_layers(trained)[0]
    x = _layer_input(model, stem, torch.rand(3, 128, 128) * 255)
    expected = F.batch_norm(x, None, None, stem.weight, stem.bias, training=True, eps=stem.eps)
    torch.testing.assert_close(stem(x), expected)
    # The trained model is left as it was: running statistics, eval mode.
    assert trained_stem.running_mean is not None and trained_stem.track_running_stats


def test_precise_mode_recomputes_the_statistics_from_training_images(bn_run):
    cfg, trained = load_run(bn_run[0])
    before = [layer.running_var.clone() for layer in bn_layers(trained)]
    model = with_statistics(trained, "precise", cfg, precise_images=4)
    assert not model.training
    after = [layer.running_var for layer in bn_layers(model)]
    assert all(torch.equal(b, layer.running_var) for b, layer in zip(before, bn_layers(trained)))
    assert not all(torch.equal(b, a) for b, a in zip(before, after))
    assert all(layer.momentum == 0.1 for layer in bn_layers(model))  # fvcore restores it
    with pytest.raises(ValueError, match="config"):
        with_statistics(trained, "precise")


def test_bad_input_is_refused(bn_run, tmp_path):
    run_dir, _ = bn_run
    with pytest.raises(ValueError, match="modes must be among"):
        evaluate_bn_modes(run_dir, modes=["ema"])
    with pytest.raises(ValueError, match="positive"):
        evaluate_bn_modes(run_dir, precise_images=0)
    with pytest.raises(FileNotFoundError, match="no finished run"):
        evaluate_bn_modes(tmp_path)
    with pytest.raises(ValueError, match="mode must be one of"):
        with_statistics(nn.BatchNorm2d(4), "ema")


def test_a_model_without_batchnorm_is_refused(gn_run):
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        evaluate_bn_modes(gn_run[0], modes=["running"])


def test_tool_prints_a_table_and_refuses_an_unfinished_run(bn_run, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bn_statistics_study",
        Path(__file__).resolve().parent.parent / "tools" / "bn_statistics_study.py",
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run_dir, _ = bn_run
    out = tmp_path / "found.json"
    assert tool.main([str(run_dir), "--modes", "running", "--json", str(out)]) == 0
    assert f"| {run_dir.name} | running | " in capsys.readouterr().out and out.is_file()
    with pytest.raises(SystemExit):
        tool.main([str(run_dir), "--modes", "running", "--json", str(out)])  # exists, no --force
    assert "exists; pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path)])
    assert "not a finished run" in capsys.readouterr().err
