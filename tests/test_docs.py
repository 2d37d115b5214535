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


def _repository_files():
    """Every file of the repository (tracked, or new and not ignored) that is text."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        path = ROOT / name
        if path.is_file() and path.suffix not in (".png", ".pkl", ".pth", ".whl"):
            try:
                yield path, path.read_text()
            except UnicodeDecodeError:
                continue


def test_no_file_of_the_repository_names_a_path_outside_it():
    """A user who clones the repository finds everything a file refers to inside it: no team
    notes outside the repository, no machine's paths, no link that leaves the checkout."""
    team_notes = re.compile(
        "|".join([r"\bshared/" + "DESIGN", "DESIGN" + r"\.md", r"\.\./" + "shared"])
    )
    machine_paths = re.compile(r"(?<![\w.])/(?:" + "work|root" + r")/")
    found = []
    for path, text in _repository_files():
        for pattern in (team_notes, machine_paths):
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
        if path.suffix == ".md":
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if "://" in target or target.startswith(("#", "mailto:")):
                    continue
                resolved = (path.parent / target.split("#")[0]).resolve()
                if not resolved.is_relative_to(ROOT) or not resolved.exists():
                    found.append(f"{path.relative_to(ROOT)}: link {target}")
    assert not found, found
