"""``gn-det train`` and its weights: every bad checkpoint is one line and exit code 2 before any
process starts; the ordinary fine-tuning cases load with a one-line summary."""

import logging

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone

from gn_det.checkpoint import Checkpointer
from gn_det.cli.config_files import load_config, resolve_config_name
from gn_det.cli.train import launch_from_args
from gn_det.modeling.meta_arch import routed_copy

SHAPES = ["--config", "shapes/gn.yaml"]  # an R-18 + FPN Mask R-CNN, converted to GN


def _cpu_config(name):
    cfg = load_config(str(resolve_config_name(name)))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoint files: the shapes model's own, its backbone body alone, an R-50's tensors under
    the R-18's names (what of an R-50 checkpoint can reach it), and broken or corrupt ones."""
    folder = tmp_path_factory.mktemp("weights")
    state = build_model(routed_copy(_cpu_config("shapes/gn.yaml"))).state_dict()
    body = {k: v for k, v in state.items() if k.startswith("backbone.bottom_up.")}
    r50 = build_resnet_backbone(_cpu_config("mask_rcnn_R_50_FPN_bn.yaml"), ShapeSpec(channels=3))
    r50 = {f"backbone.bottom_up.{k}": v.half() for k, v in r50.state_dict().items()}
    paths = {name: folder / f"{name}.pth" for name in ("shapes", "body", "r50", "list")}
    torch.save({"model": state}, paths["shapes"])
    torch.save({"model": body}, paths["body"])
    paths["body_without_stem_norm"] = folder / "body_without_stem_norm.pth"
    torch.save({"model": {k: v for k, v in body.items() if ".stem.conv1.norm." not in k}},
               paths["body_without_stem_norm"])
    torch.save({"model": {k: v for k, v in r50.items() if k in state}}, paths["r50"])
    torch.save([1, 2], paths["list"])
    # An ImageNet-style BN backbone with an impossible statistic, transferred into GN on load.
    bn = build_model(_cpu_config("shapes/bn.yaml")).state_dict()
    bn = {k: v for k, v in bn.items() if k.startswith("backbone.bottom_up.")}
    bn["backbone.bottom_up.res4.1.conv2.norm.running_var"][3] = -2.0
    paths["corrupt"] = folder / "corrupt.pth"
    torch.save({"model": bn}, paths["corrupt"])
    paths["text"] = folder / "weights.txt"
    paths["text"].write_text("not a checkpoint\n")
    paths["truncated"] = folder / "truncated.pth"
    paths["truncated"].write_bytes(paths["body"].read_bytes()[:4096])
    paths["missing"] = folder / "missing.pth"
    return paths


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gn_det.cli.train.launch", lambda *a, **k: pytest.fail("launched"))
    return tmp_path


@pytest.mark.parametrize("eval_only", [False, True])
@pytest.mark.parametrize(
    "name, message",
    [
        ("text", "unknown checkpoint format"),
        ("truncated", "truncated or corrupt"),
        ("list", "holds a list, expected a dict"),
        ("missing", "no such file"),
        ("corrupt", "'backbone.bottom_up.res4.1.conv2.norm': 1 of the 256 values of its "
                    "running_var are negative or not finite (the first: -2)"),
        ("r50", "sets 43 of the model's 112 tensors and 56% of its backbone's values "
                "(backbone.bottom_up; gn_det loads one that sets at least 90%): first not set: "
                "backbone.bottom_up.res2.0.conv1, "),
    ],
)
def test_a_bad_checkpoint_is_one_line_and_exit_2_before_training(
    name, message, eval_only, files, no_training, capsys
):
    argv = SHAPES + ["--eval-only"] * eval_only + ["MODEL.WEIGHTS", str(files[name])]
    with pytest.raises(SystemExit) as exit_:
        launch_from_args(argv, prog="gn-det train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gn-det train: error: MODEL.WEIGHTS: ") and message in err, err
    assert len(err.splitlines()) == 1, err
    assert list(no_training.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "name, overrides, level, summary",
    [
        ("shapes", [], logging.INFO,
         "sets 112 of the model's 112 tensors and 100% of its backbone's values"),
        # A new class count: the predictors' shapes differ, everything else loads.
        ("shapes", ["MODEL.ROI_HEADS.NUM_CLASSES", "7"], logging.WARNING,
         "sets 106 of the model's 112 tensors and 100% of its backbone's values; of other "
         "shapes, left as built: roi_heads.box_predictor.cls_score, "
         "roi_heads.box_predictor.bbox_pred, roi_heads.mask_head.predictor"),
        # An ImageNet backbone into a detector: the FPN and the heads are missing, as expected.
        ("body", [], logging.INFO,
         "sets 60 of the model's 112 tensors and 100% of its backbone's values; 52 not in the "
         "checkpoint (backbone, proposal_generator, roi_heads)"),
        # Part of the backbone left as built: loaded (over 90%), with a warning.
        ("body_without_stem_norm", [], logging.WARNING,
         "sets 58 of the model's 112 tensors and 100% of its backbone's values; 54 not in the "
         "checkpoint (backbone, proposal_generator, roi_heads)"),
    ],
)
def test_fitting_checkpoints_load_with_a_one_line_summary(
    name, overrides, level, summary, files, monkeypatch, caplog
):
    launched = []
    monkeypatch.setattr("gn_det.cli.train.launch", lambda *a, **k: launched.append(a))
    launch_from_args(SHAPES + ["MODEL.WEIGHTS", str(files[name]), *overrides])
    assert len(launched) == 1
    # What each process logs as it loads them: one line, fvcore's per-key lists at DEBUG.
    cfg = _cpu_config("shapes/gn.yaml")
    cfg.merge_from_list(overrides)
    model = build_model(routed_copy(cfg))
    caplog.set_level(logging.DEBUG)
    Checkpointer(model).load_weights(str(files[name]))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert (level, f"{files[name]}: {summary}") in lines
    warnings = [m for n, m in lines if n >= logging.WARNING]
    assert warnings == ([f"{files[name]}: {summary}"] if level == logging.WARNING else [])


def test_resume_checks_the_checkpoint_it_would_resume_from(files, no_training, capsys):
    out = no_training / "out"
    out.mkdir()
    (out / "model_0000009.pth").write_bytes(files["truncated"].read_bytes())
    (out / "last_checkpoint").write_text("model_0000009.pth")
    argv = SHAPES + ["--resume", "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(files["body"])]
    with pytest.raises(SystemExit) as exit_:
        launch_from_args(argv, prog="gn-det train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"gn-det train: error: --resume: {out}/model_0000009.pth: truncated or corrupt " \
                  "zip archive (File is not a zip file)\n"


def test_folded_without_group_norm_is_one_line_and_exit_2_before_training(no_training, capsys):
    argv = ["--config", "shapes/bn.yaml", "MODEL.NORM_CONVERSION.FOLDED", "True"]
    with pytest.raises(SystemExit) as exit_:
        launch_from_args(argv, prog="gn-det train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gn-det train: error: MODEL.NORM_CONVERSION.FOLDED True folds "), err
    assert len(err.splitlines()) == 1, err
    assert list(no_training.iterdir()) == []  # nothing written
