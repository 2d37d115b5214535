"""lab/tools/gpu_smoke.py: each check's failing branch, reached on the CPU.

No GPU runs here, so the CUDA-only outcomes (a silent CPU run, gloo where NCCL belongs, a
non-fused AdamW, a gradient scaler that skips steps) are brought about by replacing the one
function that produces them; everything else is the check itself, on 64x64 images with the
R-18-sized detector built once per config (``detectors``), or where the check's logic does not
depend on the detector (training, resuming), a tiny conv-GN model. The whole route at CPU size
is ``test_gpu_smoke_runs_every_check_on_the_cpu`` (test_studies.py).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "lab/tools/gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(smoke):
    """The script's random-weight detectors, one build per config (a build is seeded, so a copy
    is what a second build would give)."""
    cache, build = {}, smoke._model

    def model(cfg, batch):
        key = cfg.dump()
        if key not in cache:
            cache[key] = build(cfg, batch)
        return copy.deepcopy(cache[key])

    return model


@pytest.fixture
def detectors(smoke, built, monkeypatch):
    monkeypatch.setattr(smoke, "_model", built)


class _TinyDetector(nn.Module):
    """Takes the script's training inputs, returns a loss dict: what the training loops need."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, batch):
        x = torch.stack([d["image"] for d in batch]) / 255
        return {"loss": self.head(self.norm(self.conv(x)).relu().mean((2, 3))).pow(2).mean()}


@pytest.fixture
def tiny(smoke, monkeypatch):
    monkeypatch.setattr(smoke, "_model", lambda cfg, batch: _TinyDetector().train())


def _args(device: str = "cpu", **changes) -> argparse.Namespace:
    args = dict(device=device, small=True, width=64, height=64, images=1, iterations=1)
    args.update(debug=False, json=None, checks=[])
    return argparse.Namespace(**{**args, **changes})


def test_cuda_is_the_default_and_a_host_without_one_exits_2(smoke, monkeypatch, capsys):
    """No silent CPU run: without --device the script asks for CUDA, and refuses where torch
    sees none, before any check runs."""
    ran = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(smoke, "run", lambda args: ran.append(args) or [])
    with pytest.raises(SystemExit) as exited:
        smoke.main(["--checks", "fold"])
    assert exited.value.code == 2 and not ran
    assert "--device cpu" in capsys.readouterr().err


def test_a_cuda_check_that_allocated_nothing_on_the_gpu_fails(smoke, monkeypatch):
    counter = iter(range(100))
    monkeypatch.setattr(smoke, "check_fold", lambda args: "fine")
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {"allocation.all.allocated": 7})
    [row] = smoke.run(_args("cuda", checks=["fold"]))
    assert row["status"] == "FAIL" and "allocated on the GPU" in row["detail"], row
    # ... and one that did passes
    monkeypatch.setattr(
        torch.cuda, "memory_stats", lambda: {"allocation.all.allocated": next(counter)}
    )
    [row] = smoke.run(_args("cuda", checks=["fold"]))
    assert row["status"] == "PASS", row


def test_adamw_must_be_the_fused_one_where_torch_has_it(smoke, tiny, monkeypatch):
    def not_fused(cfg, model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    monkeypatch.setattr(smoke, "build_optimizer", not_fused)
    with pytest.raises(AssertionError, match="not fused on cpu"):
        smoke.check_train_amp_adamw_clip(_args())


def _fake_ddp(backend: str):
    def launch(function, processes, *, device, dist_url, args):
        rank = {"backend": backend, "gn": [6.1, 6.0], "naive_syncbn": [6.2, 6.1]}
        Path(args[1]).write_text(json.dumps([rank] * processes))

    return launch


def test_two_gpu_processes_must_join_over_nccl(smoke, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(smoke, "launch", _fake_ddp("gloo"))
    with pytest.raises(AssertionError, match="backend gloo, expected nccl"):
        smoke.check_ddp_2_processes(_args("cuda"))
    monkeypatch.setattr(smoke, "launch", _fake_ddp("nccl"))
    assert "nccl" in smoke.check_ddp_2_processes(_args("cuda"))


def _fits(before: float, after: float) -> list:
    return [SimpleNamespace(error_before=before, error_after=after)] * 3


def test_calibration_must_lower_the_error_by_the_stated_margin(smoke, detectors, monkeypatch):
    import gn_det

    monkeypatch.setattr(gn_det, "calibrate", lambda *a, **k: _fits(0.25, 0.24))  # 4 % lower
    with pytest.raises(AssertionError, match=r"calibration lowered .* not to 0.9x"):
        smoke.check_calibrate_distill(_args())


def test_distillation_must_lower_its_loss_on_its_fixed_batch(smoke, detectors, monkeypatch):
    import gn_det

    calls = []

    def distill(student, teacher, images, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(losses=losses)

    monkeypatch.setattr(gn_det, "calibrate", lambda *a, **k: _fits(0.25, 0.12))
    monkeypatch.setattr(gn_det, "distill", distill)
    losses = [0.34, 2.4, 0.72, 0.64]  # finite, and worse
    with pytest.raises(AssertionError, match="distillation did not lower its loss"):
        smoke.check_calibrate_distill(_args())
    losses = [0.34, 0.28, 0.26, 0.25]
    assert "loss 0.3400 -> 0.2500" in smoke.check_calibrate_distill(_args())
    assert calls[-1]["batch_size"] == 2 and calls[-1]["steps"] == len(losses)


def _skipping_first_steps(smoke, skipped: int):
    """build_optimizer whose optimizers ignore their first ``skipped`` steps, as AMP's gradient
    scaler skips the steps whose float16 gradients overflow."""
    build = smoke.build_optimizer

    def build_optimizer(cfg, model):
        optimizer = build(cfg, model)
        step, calls = optimizer.step, []

        def skipping_step(*args, **kwargs):
            calls.append(1)
            return None if len(calls) <= skipped else step(*args, **kwargs)

        optimizer.step = skipping_step
        return optimizer

    return build_optimizer


def test_resume_trains_until_the_first_optimizer_step(smoke, tiny, monkeypatch):
    monkeypatch.setattr(smoke, "build_optimizer", _skipping_first_steps(smoke, 2))
    detail = smoke.check_resume(_args())
    assert detail.count("first step at iteration 3") == 2, detail


def test_resume_fails_when_the_optimizer_never_steps(smoke, tiny, monkeypatch):
    monkeypatch.setattr(smoke, "build_optimizer", _skipping_first_steps(smoke, 1000))
    with pytest.raises(AssertionError, match="no optimizer step in 6 iterations"):
        smoke.check_resume(_args())


def test_export_fails_without_onnx(smoke, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(AssertionError, match="onnx is not installed"):
        smoke.check_export(_args())


def test_export_compares_detection_counts_first(smoke, detectors, monkeypatch):
    """A traced module that returns one detection fewer (20 at score threshold 0, the smoke
    configs' TEST.DETECTIONS_PER_IMAGE) is named as such, not as a shape error."""

    def trace(adapter, inputs, **kwargs):
        adapter(*inputs)  # as tracing does: the adapter learns its outputs' schema

        def traced(image):
            return tuple(t[:-1] if t.dim() and t.shape[0] == 20 else t for t in adapter(image))

        return traced

    monkeypatch.setattr(torch.jit, "trace", trace)
    with pytest.raises(AssertionError, match="19 traced vs 20 eager detections"):
        smoke.check_export(_args())


def test_onnx_export_passes_dynamo_only_where_torch_has_it(smoke, detectors, monkeypatch):
    """torch 2.3-2.4's torch.onnx.export has no ``dynamo`` argument (TypeError if given)."""
    import onnx
    from onnx import TensorProto, helper

    exported = []

    def export_of_torch_2_3(model, args, f, export_params=True, verbose=False, opset_version=None):
        exported.append(opset_version)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])
        scale = helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4)
        bias = helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.0] * 4)
        node = helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"])
        graph = helper.make_graph([node], "gn", [x], [y], [scale, bias])
        f.write(
            helper.make_model(
                graph, opset_imports=[helper.make_opsetid("", 16)]
            ).SerializeToString()
        )

    monkeypatch.setattr(
        torch.jit, "trace", lambda adapter, inputs, **k: adapter(*inputs) and adapter
    )
    monkeypatch.setattr(torch.jit, "save", lambda module, f: f.write(b"TorchScript"))
    monkeypatch.setattr(torch.onnx, "export", export_of_torch_2_3)
    detail = smoke.check_export(_args())
    assert exported == [16] and "1 InstanceNormalization" in detail, detail
    assert onnx.__version__ in detail


def _docker_commands(markdown: str) -> list:
    """The ``docker run`` commands of the markdown's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if "docker run" in line]


def test_docker_md_runs_the_smoke_script_with_the_image_python():
    """The image's ENTRYPOINT is ``python tools/train_net.py``: the documented command must
    replace it, and the script and its lab/ package must be in the build context."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", dockerfile, flags=re.M)[1])
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile, flags=re.M)[-1]
    [command] = [
        c for c in _docker_commands((ROOT / "docs/docker.md").read_text()) if "gpu_smoke" in str(c)
    ]
    assert "--entrypoint" in command, command
    program = command[command.index("--entrypoint") + 1]
    assert program == entrypoint[0] == "python", (program, entrypoint)
    script = command[command.index("gn-det") + 1]
    assert (ROOT / script).is_file() and not script.startswith("/"), (script, workdir)
    assert {"--gpus", "all"} <= set(command) and "--device" not in command
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "lab" not in ignored and "lab/" not in ignored


def test_the_image_installs_the_pinned_onnx_for_the_export_check():
    def pins(text):
        return dict(re.findall(r"^\s*([A-Za-z0-9_.-]+)==([^\s#\\]+)", text, flags=re.M))

    docker = pins((ROOT / "Dockerfile").read_text())
    base = pins((ROOT / "requirements/base.txt").read_text())
    for name in ("onnx", "ml-dtypes"):
        assert docker.get(name) == base[name], (name, docker.get(name), base[name])
