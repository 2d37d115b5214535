import subprocess
import sys
from pathlib import Path

import pytest
from detectron2 import model_zoo

from gn_det.cli import main

SYNCBN = model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml")


def test_inspect_lists_the_converted_layers(capsys):
    assert main(["inspect", "--config-file", SYNCBN, "--to", "GN", "MODEL.RESNETS.STRIDE_IN_1X1", "False"]) == 0
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
        (["inspect", "--config-file", "missing.yaml"], "missing.yaml: no such config file"),
        (["inspect", "--config-file", SYNCBN, "MODEL.NO_SUCH_KEY", "1"], "unknown config key MODEL.NO_SUCH_KEY; MODEL has: "),
        (["inspect", "--config-file", SYNCBN, "--to", "LayerNorm"], "valid targets: GN, FrozenBN"),
        (["inspect", "--config-file", SYNCBN, "--to", "GN", "--num-groups", "0"], "positive integer"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_and_help():
    gn_det_script = Path(sys.executable).parent / "gn-det"
    out = subprocess.run([str(gn_det_script), "inspect", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--config-file" in out and "--dim-per-group" in out
    result = subprocess.run([sys.executable, "-m", "gn_det.cli", "inspect", "--num-groups", "8",
                             "--dim-per-group", "16", "--config-file", SYNCBN], capture_output=True, text=True)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
