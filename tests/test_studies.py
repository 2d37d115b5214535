"""The study scripts run (smoke mode), so they cannot rot."""

import importlib.util
from pathlib import Path

from PIL import Image

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_study_smoke(tmp_path, capsys):
    out = tmp_path / "fidelity.png"
    assert _tool("transfer_study").main(["--smoke", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    for method in ("copy", "stats", "calibrate 2", "calibrate 4 (local)"):
        assert f"| shared statistics | {method} |" in table
        assert f"| per-image photometrics | {method} |" in table
    assert Image.open(out).size == (800, 400)
