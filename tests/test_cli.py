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


def test_console_script_and_help():
    gn_det_script = Path(sys.executable).parent / "gn-det"
    out = subprocess.run(
        [str(gn_det_script), "inspect", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--config-file" in out and "--dim-per-group" in out
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gn_det.cli",
            "inspect",
            "--num-groups",
            "8",
            "--dim-per-group",
            "16",
            "--config-file",
            SYNCBN,
        ],
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
