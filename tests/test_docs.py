"""What the README and docs tell a user to run: commands that work as written."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shell_lines(markdown: str):
    """The commands of a Markdown file's bash code blocks, continuation lines joined."""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", markdown, flags=re.S):
        yield from (line.strip() for line in block.replace("\\\n", " ").splitlines())


def test_every_pip_install_of_detectron2_from_source_disables_build_isolation():
    """detectron2's setup.py imports torch; pip's isolated build environment has none
    ("No module named 'torch'"), so a source install needs --no-build-isolation."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in _shell_lines(path.read_text()):
            words = shlex.split(line, comments=True) if line.startswith("pip ") else []
            if words[:2] == ["pip", "install"] and any("detectron2.git" in w for w in words):
                found.append((path.name, line))
                assert "--no-build-isolation" in words, (path.name, line)
    assert found, "the docs show no source install of detectron2"
