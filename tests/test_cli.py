import subprocess
import sys
from pathlib import Path

import pytest
from detectron2 import model_zoo

from gn_det.cli import main

SYNCBN = model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml")


def test_inspect_lists_the_converted_layers(capsys):
    assert (
        main(
            [
                "inspect",
                "--config-file",
                SYNCBN,
                "--to",
                "GN",
                "MODEL.RESNETS.STRIDE_IN_1X1",
                "False",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "roi_heads.mask_head.mask_fcn4.norm" in out
    assert "ConvertedGroupNorm       69" in out


def test_inspect_without_conversion_counts_the_source_types(capsys):
    assert main(["inspect", "--config-file", SYNCBN]) == 0
    out = capsys.readouterr().out
    # FREEZE_AT=2 freezes the stem and res2: 1 + 3 x 3 + 1 shortcut = 11 FrozenBN; 58 SyncBN remain.
    assert "FrozenBatchNorm2d       11" in out and "SyncBatchNorm           58" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["inspect", "--config-file", "missing.yaml"],
            "No config 'missing.yaml': not a file, not in ",
        ),
        (
            ["inspect", "--config-file", SYNCBN, "MODEL.NO_SUCH_KEY", "1"],
            "unknown config key MODEL.NO_SUCH_KEY; MODEL has: ",
        ),
        (["inspect", "--config-file", SYNCBN, "--to", "LayerNorm"], "valid targets: GN, FrozenBN"),
        (
            ["inspect", "--config-file", SYNCBN, "--to", "GN", "--num-groups", "0"],
            "positive integer",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_and_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["inspect", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--config-file" in out and "--dim-per-group" in out
    # The installed console script (one process: python -m gn_det.cli is test_checkpoint_convert's).
    gn_det_script = Path(sys.executable).parent / "gn-det"
    result = subprocess.run(
        [str(gn_det_script), "inspect", "--num-groups", "8", "--dim-per-group", "16",
         "--config-file", SYNCBN],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


@pytest.mark.parametrize("flag", ["--config", "--config-file"])
def test_detectron2_model_zoo_names_work_with_either_flag(flag, capsys):
    """A name that is neither a file nor one of gn_det's configs is looked up in detectron2's
    model zoo; with the switch on, its model is converted."""
    assert (
        main(
            [
                "inspect",
                flag,
                "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
                "MODEL.NORM_CONVERSION.ENABLED",
                "True",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.rstrip().endswith("ConvertedGroupNorm       69")
    assert main(["inspect", flag, "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x"]) == 0
    assert "FrozenBatchNorm2d       53" in capsys.readouterr().out


MALFORMED = {
    "unclosed.yaml": (
        "MODEL:\n  PIXEL_MEAN: [1, 2\nSOLVER:\n  BASE_LR: 0.1\n",
        "not valid YAML: line 3, column 7",
    ),
    "stray.yaml": (
        "MODEL:\n  DEVICE: cpu\n @@\n",
        "not valid YAML: line 3, column 2: found character '@'",
    ),
    "empty.yaml": ("", "the config file is empty"),
    "truncated.yaml": ("MODEL:\n", "MODEL is a section of keys, but the file gives it None"),
    "list.yaml": ("- MODEL\n- SOLVER\n", "this file holds a list"),
    "section.yaml": ("MODEL: 3\n", "MODEL is a section of keys, but the file gives it 3"),
    "base.yaml": ("_BASE_: missing-base.yaml\n", "its _BASE_ 'missing-base.yaml' does not exist"),
    "binary.yaml": (b"\xff\xfe\x00\x01", "not a text file"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_config_is_one_line_naming_the_file_in_every_command(
    name, tmp_path, capsys, monkeypatch
):
    from gn_det.cli.train import launch_from_args

    text, message = MALFORMED[name]
    config = tmp_path / name
    config.write_bytes(text) if isinstance(text, bytes) else config.write_text(text)
    commands = {
        "inspect": lambda: main(["inspect", "--config", str(config)]),
        "convert": lambda: main(
            [
                "convert",
                "--config",
                str(config),
                "--weights",
                str(config),
                "--output",
                str(tmp_path / "out.pth"),
            ]
        ),
        "train": lambda: launch_from_args(["--config", str(config)], prog="gn-det train"),
    }
    monkeypatch.setattr(
        "gn_det.cli.train.launch", lambda *a, **k: pytest.fail("training was launched")
    )
    for command, run in commands.items():
        try:
            code = run()
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2, (command, err)
        assert len(err.splitlines()) == 1 and str(config) in err and message in err, (command, err)
    assert not (tmp_path / "out.pth").exists()


def _flags(parser):
    return sorted(
        {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    )


def test_docs_cli_md_lists_every_flag_of_every_command():
    """docs/cli.md names each flag argparse knows, for convert, inspect and train."""
    import re

    from gn_det.cli import _parser
    from gn_det.cli.train import argument_parser

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    parser = _parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices
    parsers = {"convert": commands["convert"], "inspect": commands["inspect"]}
    parsers["train"] = argument_parser()
    missing = [
        f"{command} {flag}"
        for command, p in parsers.items()
        for flag in _flags(p)
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", doc)
    ]
    assert missing == []
    assert {"--device", "--allow-unsafe-yaml"} <= set(_flags(commands["inspect"]))


def test_help_offers_only_what_each_command_accepts(capsys):
    """inspect --help offers no calibrate or distill (it refuses them); convert --help names
    the default config of --to folded beside the source config's."""
    for command in ("inspect", "convert"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        if command == "inspect":
            assert "{copy,stats}" in out and "distill" not in out and "calibrate" not in out
        else:
            default = "(default mask_rcnn_R_50_FPN_bn.yaml; with --to folded, gn_mask_rcnn.yaml)"
            assert default in out


def test_a_cuda_device_without_a_gpu_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """--device cuda or MODEL.DEVICE cuda on the command line, where no GPU is usable: train's
    one line, exit 2, nothing written. A config file's CUDA device (detectron2's default) means
    the CPU there, and convert says where it ran."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "bn.pth"
    for argv, key in (
        (["inspect", "--config", SYNCBN, "--device", "cuda"], "--device"),
        (["inspect", "--config", SYNCBN, "MODEL.DEVICE", "cuda:1"], "MODEL.DEVICE"),
        (["convert", "--config", "shapes/bn.yaml", "--weights", str(weights), "--output", "o.pth",
          "--device", "cuda"], "--device"),
        (["convert", "--config", "shapes/bn.yaml", "--weights", str(weights), "--output", "o.pth",
          "MODEL.DEVICE", "cuda"], "MODEL.DEVICE"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{key} is 'cuda" in err, err
        assert "but no CUDA GPU is usable here" in err and f"add {key} cpu" in err
    assert list(tmp_path.iterdir()) == []

    from detectron2.modeling import build_model

    from gn_det.cli.config_files import load_config, resolve_config_name

    cfg = load_config(resolve_config_name("shapes/bn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    assert main(["convert", "--config", "shapes/bn.yaml", "--weights", str(weights), "--output",
                 "o.pth", "MODEL.NORM_CONVERSION.ENABLED", "False"]) == 0
    assert main(["convert", "--config", "shapes/bn.yaml", "--weights", str(weights), "--output",
                 "p.pth", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count(" s on cpu, verified") == 2


def test_unsafe_yaml_is_accepted_by_every_command_with_the_flag(tmp_path, capsys, monkeypatch):
    """A user's config on detectron2's RetinaNet base (a Python tag: eval on load) needs
    --allow-unsafe-yaml in inspect and convert (as in train); the model zoo's own RetinaNet
    configs load without it, and without fvcore's warning about unsafe_load."""
    base = model_zoo.get_config_file("Base-RetinaNet.yaml")
    config = tmp_path / "my_retinanet.yaml"
    config.write_text(f"_BASE_: {base}\nMODEL:\n  DEVICE: cpu\n")
    for allow in ([], ["--allow-unsafe-yaml"]):
        assert main(["inspect", "--config", str(config), *allow]) == (2 if not allow else 0)
        captured = capsys.readouterr()
        if not allow:
            assert len(captured.err.strip().splitlines()) == 1
            assert "needs unsafe YAML" in captured.err and "--allow-unsafe-yaml" in captured.err
        else:
            assert "FrozenBatchNorm2d       53" in captured.out
    assert main(["convert", "--config", str(config), "--weights", str(config), "--output",
                 str(tmp_path / "o.pth"), "--allow-unsafe-yaml"]) == 2
    assert "needs unsafe YAML" not in capsys.readouterr().err  # past the config: the weights
    assert main(["inspect", "--config", "COCO-Detection/retinanet_R_50_FPN_1x.yaml"]) == 0
    captured = capsys.readouterr()
    assert "FrozenBatchNorm2d       53" in captured.out and captured.err == ""


def test_a_checkpoint_without_bn_statistics_says_stats_was_copy(tmp_path, capsys):
    """A GN checkpoint re-converted as if it were BN has no BN statistics: the summary says so
    (the stats transfer is then copy for those layers), instead of a bare 'transfer: stats'."""
    import torch
    from detectron2.modeling import build_model

    from gn_det.cli.config_files import load_config, resolve_config_name

    cfg = load_config(resolve_config_name("shapes/gn.yaml"))
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "gn.pth")
    assert main(["convert", "--config", "shapes/bn.yaml", "--weights", str(tmp_path / "gn.pth"),
                 "--output", str(tmp_path / "again.pth")]) == 0
    out = capsys.readouterr().out
    assert "transfer: stats (the checkpoint has no BN statistics for " in out
    assert ": for them, as copy)" in out
