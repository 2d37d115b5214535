"""tools/train_net.py end to end on the embedded dataset (tiny runs), and its loaders."""

import json
import signal
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import gn_det
from gn_det.checkpoint import Checkpointer
from gn_det.cli.config_files import load_config, resolve_config_name
from models import TINY, randomize_norm_state, resnet18_fpn_backbone
from reference import stats_transfer_reference

REPO = Path(__file__).resolve().parent.parent
TRAIN_NET = REPO / "tools" / "train_net.py"


def _train_net(args, env, cwd):
    return subprocess.run(
        [sys.executable, str(TRAIN_NET), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _metrics(output_dir):
    lines = (Path(output_dir) / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("variant", ["frozenbn", "bn", "gn", "gn_demo"])
def test_two_iterations_of_each_shapes_config(variant, tiny_env, tmp_path):
    out = tmp_path / "out"
    # The demo evaluates on the held-out test split: so does its tiny run.
    test_split = ["DATASETS.TEST", "('shapes_tiny_test',)"] if variant == "gn_demo" else []
    result = _train_net(
        ["--config", f"shapes/{variant}.yaml", *TINY, *test_split, "OUTPUT_DIR", str(out)],
        tiny_env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Norm layers:" in log
    if variant == "gn_demo":
        assert (
            "Training loop: CPUAutocastTrainer; optimizer: AdamW" in log
            or "no native bfloat16" in log
        )
        assert "Evaluation results for shapes_tiny_test in csv format" in log
    if variant in ("gn", "gn_demo"):
        assert (
            "ConvertedGroupNorm x" in log
            and "BatchNorm" not in log.split("Norm layers:")[1].splitlines()[0]
        )
    if variant == "bn":
        assert "BatchNorm layers train on batch statistics of 2 image(s)" in log
        assert "MODEL.NORM_CONVERSION.ENABLED True" in log
    metrics = _metrics(out)
    assert any("total_loss" in m for m in metrics)
    assert any("bbox/AP" in m for m in metrics)  # COCO evaluation ran (segm too, given predictions)
    assert (out / "model_final.pth").is_file()


def test_two_cpu_processes_with_num_gpus_2_on_a_gpu_host(gpu_host, tmp_path):
    """A CPU config on a host with GPUs: gloo and no GPU in the processes (detectron2's launch
    alone picks NCCL whenever the host has a GPU, whatever MODEL.DEVICE says)."""
    out = tmp_path / "out"
    # A free rendezvous port, so that the test passes beside another multi-process run.
    result = _train_net(
        [
            "--config",
            "shapes/gn.yaml",
            "--num-gpus",
            "2",
            "--dist-url",
            "auto",
            *TINY,
            "SOLVER.IMS_PER_BATCH",
            "2",
            "OUTPUT_DIR",
            str(out),
        ],
        gpu_host,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "No: torch.cuda.is_available() == False" in log  # detectron2's environment info, rank 0
    assert (out / "log.txt.rank1").is_file()
    assert any("bbox/AP" in m for m in _metrics(out))


def test_unsafe_yaml_is_refused_with_a_clear_message(tiny_env, tmp_path):
    config = tmp_path / "unsafe.yaml"
    config.write_text(
        'MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: !!python/object/apply:eval ["[[32]]"]\n'
    )
    result = _train_net(["--config-file", str(config), "--eval-only"], tiny_env, cwd=tmp_path)
    assert result.returncode != 0
    assert "needs unsafe YAML" in result.stderr and "--allow-unsafe-yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_config_name_lists_the_available_ones(tiny_env, tmp_path):
    result = _train_net(["--config", "gn_mask_rnn.yaml"], tiny_env, cwd=tmp_path)
    assert (
        result.returncode != 0
        and "Available in gn_det:" in result.stderr
        and "gn_mask_rcnn.yaml" in result.stderr
    )


def test_torchvision_imagenet_weights_load_into_the_converted_torchvision_backbone(tmp_path):
    cfg = load_config(resolve_config_name("gn_mask_rcnn_torchvision_R_50.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    from detectron2.modeling import build_model

    model = build_model(cfg)
    assert not [m for m in model.modules() if gn_det.NORM_SOURCES.lookup(m) is not None]
    resnet = torchvision.models.resnet50()
    bn = randomize_norm_state(resnet.layer3[1].bn2)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")  # torchvision's format, as is
    incompatible = Checkpointer(model).load(str(tmp_path / "resnet50.pth"))
    assert incompatible is not None
    gn = model.backbone.bottom_up.layer3[1].bn2
    expected_w, expected_b = stats_transfer_reference(
        bn.weight.detach(),
        bn.bias.detach(),
        bn.running_mean,
        bn.running_var,
        num_groups=32,
        eps=1e-5,
    )
    torch.testing.assert_close(gn.weight.detach().double(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn.bias.detach().double(), expected_b, rtol=1e-5, atol=1e-6)


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_final_iteration(
    tiny_env, tmp_path
):
    from gn_det.checkpoint.io import load_checkpoint_file

    out = tmp_path / "out"
    args = [
        "--config",
        "shapes/gn.yaml",
        *TINY,
        "SOLVER.MAX_ITER",
        "8",
        "SOLVER.STEPS",
        "(4,)",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "TEST.EVAL_PERIOD",
        "0",
        "OUTPUT_DIR",
        str(out),
    ]
    run = subprocess.Popen(
        [sys.executable, str(TRAIN_NET), *args],
        env=tiny_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while (
            not (out / "last_checkpoint").exists()
            and run.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert not (out / "model_final.pth").exists(), "the run finished before it could be killed"
    saved = sorted(out.glob("model_*.pth"))
    assert saved, "no checkpoint before the kill"
    for path in saved:  # complete, whenever the kill came
        assert load_checkpoint_file(path)["iteration"] >= 1
    last = out / (out / "last_checkpoint").read_text().strip()
    resumed_from = load_checkpoint_file(last)["iteration"]

    result = _train_net(["--resume", *args], tiny_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Loading {last} (detectron2" in log
    assert f"Starting training from iteration {resumed_from + 1}" in log
    final = load_checkpoint_file(out / "model_final.pth")
    assert final["iteration"] == 7
    trainer = final["trainer"]
    # The LR schedule and the optimizer state continued rather than restarted.
    assert trainer["hooks"]["LRScheduler"]["last_epoch"] == 8
    assert trainer["_trainer"]["optimizer"]["state"], "SGD momentum buffers were saved"


def test_an_interrupted_checkpoint_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000003", iteration=3)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert checkpointer.get_checkpoint_file().endswith("model_0000001.pth")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--config", "gn_mask_rcnn.yaml", "MODEL.NORM_CONVERSION.TARGTE", "GN"],
            "unknown config key MODEL.NORM_CONVERSION.TARGTE; "
            "did you mean MODEL.NORM_CONVERSION.TARGET?",
        ),
        (
            ["--config", "gn_mask_rcnn.yaml", "MODEL.NORM_CONVERSION.TARGET", "LN"],
            "MODEL.NORM_CONVERSION.TARGET = 'LN': Unknown norm target 'LN'; "
            "valid targets: GN, FrozenBN",
        ),
        (
            ["--config", "gn_mask_rcnn.yaml", "MODEL.NORM_CONVERSION.NUM_GROUPS", "0"],
            "MODEL.NORM_CONVERSION.NUM_GROUPS = 0: num_groups must be a positive integer",
        ),
        (
            ["--config", "gn_mask_rcnn.yaml", "DATASETS.TRAIN", "('coco_2017_val',)"],
            "Dataset 'coco_2017_val': annotation file not found at ",
        ),
        (
            ["--config", "shapes/gn.yaml", "DATASETS.TRAIN", "('shapes_trian',)"],
            "Dataset 'shapes_trian' is not registered; registered datasets: ",
        ),
        (["--config", "gn_mask_rnn.yaml"], "No config 'gn_mask_rnn.yaml'"),
        (
            ["--config", "shapes/gn.yaml", "MODEL.WEIGHTS", "missing.pth"],
            "MODEL.WEIGHTS: no such file 'missing.pth'",
        ),
        (
            ["--config", "lazy/shapes_gn.py", "train.max_itr=3"],
            "lazy/shapes_gn.py: unknown config key train.max_itr; train has: ",
        ),
        (
            ["--config", "lazy/shapes_gn.py", "train.max_iter"],
            "overrides are KEY=VALUE, got 'train.max_iter'",
        ),
        ([], "give a config"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2_before_any_model_is_built(
    argv, message, capsys, monkeypatch, tmp_path
):
    from gn_det.cli.train import launch_from_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "gn_det.cli.train.launch", lambda *a, **k: pytest.fail("training was launched")
    )
    with pytest.raises(SystemExit) as exit_:
        launch_from_args(argv, prog="gn-det train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        len(err.splitlines()) == 1 and err.startswith("gn-det train: error: ") and message in err
    ), err
    with pytest.raises(Exception) as error:  # --debug: the exception itself, not SystemExit(2)
        launch_from_args(["--debug", *argv], prog="gn-det train")
    assert not isinstance(error.value, SystemExit)


class _Recorder(torch.nn.Module):
    """A detectron2-style model (inputs: list of dicts; returns a loss dict) that records the
    dtype its convolution computed in."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.dtypes = []

    def forward(self, batch):
        y = self.conv(torch.stack([d["image"] for d in batch]))
        self.dtypes.append((y.dtype, self.norm(y).dtype))
        return {"loss": self.norm(y).float().pow(2).mean()}


def test_cpu_autocast_trainer_runs_the_forward_in_bfloat16_and_keeps_float32_weights():
    from gn_det.engine import CPUAutocastTrainer, TrainLoop as SimpleTrainer

    data = [[{"image": torch.rand(3, 8, 8)}]] * 3
    runs = {}
    for trainer_class in (SimpleTrainer, CPUAutocastTrainer):
        torch.manual_seed(0)
        model = _Recorder()
        trainer = trainer_class(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
        trainer.train(0, 3)
        runs[trainer_class] = model
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert "forward" not in model.__dict__  # the wrapper is gone after each step
    assert runs[SimpleTrainer].dtypes == [(torch.float32, torch.float32)] * 3
    # Convolutions compute in bfloat16; GroupNorm takes and returns their bfloat16 (autocast's
    # CPU policy leaves it alone; its kernel accumulates the statistics in float32).
    assert runs[CPUAutocastTrainer].dtypes == [(torch.bfloat16, torch.bfloat16)] * 3
    a, b = runs[SimpleTrainer].conv.weight, runs[CPUAutocastTrainer].conv.weight
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05)  # trained, and alike


def test_amp_on_cpu_picks_bfloat16_autocast_or_falls_back_with_a_warning(monkeypatch, caplog):
    from gn_det import engine

    assert engine.training_loop_class(False, "cpu") is engine.TrainLoop
    monkeypatch.setattr(engine, "cpu_bfloat16_supported", lambda: True)
    assert engine.training_loop_class(True, "cpu") is engine.CPUAutocastTrainer
    monkeypatch.setattr(engine, "cpu_bfloat16_supported", lambda: False)
    with caplog.at_level("WARNING", logger="gn_det.engine"):
        assert engine.training_loop_class(True, "cpu") is engine.TrainLoop
    assert "no native bfloat16" in caplog.text
    assert engine.training_loop_class(True, "cuda") is engine.CUDAAMPTrainer
    assert engine.training_loop_class(True, "cuda:1") is engine.CUDAAMPTrainer
    assert engine.training_loop_class(False, "cuda") is engine.TrainLoop


def test_solver_optimizer_adamw_uses_detectron2s_parameter_groups():
    from detectron2.solver import build_optimizer as detectron2_build_optimizer

    from gn_det.engine import build_optimizer

    cfg = load_config(resolve_config_name("shapes/gn.yaml"))
    cfg.MODEL.DEVICE, cfg.SOLVER.OPTIMIZER = "cpu", "SGD"
    model = gn_det.convert_norm(resnet18_fpn_backbone(freeze_at=0))
    sgd = build_optimizer(cfg, model)
    reference = detectron2_build_optimizer(cfg, model)
    assert type(sgd) is type(reference) and len(sgd.param_groups) == len(reference.param_groups)
    cfg.merge_from_list(
        [
            "SOLVER.OPTIMIZER",
            "AdamW",
            "SOLVER.BASE_LR",
            "0.001",
            "SOLVER.BETAS",
            "(0.9, 0.99)",
            "SOLVER.WEIGHT_DECAY",
            "0.05",
            "SOLVER.WEIGHT_DECAY_NORM",
            "0.0",
        ]
    )
    adamw = build_optimizer(cfg, model)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.99)
    decays = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(decays[id(m.weight)] == 0.0 for m in norms)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(decays[id(m.weight)] == 0.05 for m in convs)
    assert all(g["lr"] == 0.001 for g in adamw.param_groups)
    # Fused where this torch has a fused CPU AdamW (>= 2.4): the same step as torch's loop.
    assert adamw.defaults["fused"] if torch.__version__ >= (2, 4) else adamw.defaults["foreach"]
    kernel = ("params", "fused", "foreach")
    loop = torch.optim.AdamW(
        [
            {
                **{k: v for k, v in g.items() if k not in kernel},
                "params": [p.detach().clone() for p in g["params"]],
            }
            for g in adamw.param_groups
        ],
        foreach=False,
        fused=False,
    )
    for group, reference_group in zip(adamw.param_groups, loop.param_groups):
        for p, q in zip(group["params"], reference_group["params"]):
            p.grad = torch.linspace(-1, 1, p.numel()).reshape(p.shape)
            q.grad = p.grad.clone()
    for _ in range(3):
        adamw.step()
        loop.step()
    for group, reference_group in zip(adamw.param_groups, loop.param_groups):
        for p, q in zip(group["params"], reference_group["params"]):
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


# --- The GPU route, checked on the CPU -------------------------------------------------------


def _pretend_cuda(monkeypatch):
    """``torch.cuda.is_available()`` True, as detectron2's AMPTrainer asserts it; the
    optimizers' CUDA-graph capture check, which would then ask a driver, is skipped."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda self: None
    )


def _clipping_adamw_cfg():
    cfg = load_config(resolve_config_name("shapes/gn.yaml"))
    cfg.merge_from_list(
        [
            "SOLVER.OPTIMIZER",
            "AdamW",
            "SOLVER.BASE_LR",
            "0.01",
            "SOLVER.WEIGHT_DECAY",
            "0.0",
            "SOLVER.CLIP_GRADIENTS.ENABLED",
            "True",
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            "norm",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
            "0.5",
        ]
    )
    return cfg


class _Regression(torch.nn.Module):
    """A detectron2-style model (inputs: list of dicts; returns a loss dict)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        return {"loss": (self.linear(x) - torch.stack([d["y"] for d in batch])).pow(2).sum()}


def _regression_data(steps=4):
    g = torch.Generator().manual_seed(1)
    # Gradient norms that differ from step to step, so that clipping changes Adam's steps.
    return [
        [{"x": torch.randn(4, generator=g) * (1 + 3 * i), "y": torch.randn(3, generator=g)}]
        for i in range(steps)
    ]


def test_amp_clips_the_unscaled_gradients_with_fused_adamw(monkeypatch):
    """SOLVER.CLIP_GRADIENTS + AdamW (fused, which unscales inside its kernel) + AMP: the clip
    must see true gradients, not gradients times the loss scale. One scaler-driven step on the
    CPU (fused CPU AdamW, a CPU GradScaler) equals clipping the unscaled gradients by hand."""
    from detectron2.engine import AMPTrainer

    from gn_det.engine import CUDAAMPTrainer, build_optimizer

    _pretend_cuda(monkeypatch)
    cfg, data = _clipping_adamw_cfg(), _regression_data()
    results = {}
    for trainer_class in (CUDAAMPTrainer, AMPTrainer):
        model = _Regression()
        optimizer = build_optimizer(cfg, model)
        assert optimizer.defaults["fused"] and type(optimizer).__name__ == "AdamWWithGradientClip"
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        trainer_class(model, data, optimizer, grad_scaler=scaler).train(0, len(data))
        results[trainer_class] = model.linear.weight.detach()

    model = _Regression()  # by hand: unscaled gradients, clipped per parameter, AdamW
    reference = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0, foreach=False)
    for batch in data:
        reference.zero_grad()
        model(batch)["loss"].backward()
        for p in model.parameters():
            torch.nn.utils.clip_grad_norm_(p, 0.5)
        reference.step()
    torch.testing.assert_close(
        results[CUDAAMPTrainer], model.linear.weight.detach(), rtol=1e-5, atol=1e-6
    )
    # detectron2's AMPTrainer clips the scaled gradients: a different (wrong) trajectory.
    assert (results[AMPTrainer] - model.linear.weight).abs().max() > 1e-3


def test_a_cuda_config_on_a_host_without_a_usable_gpu_is_one_line_and_exit_2(
    capsys, monkeypatch, tmp_path
):
    from gn_det.cli.train import launch_from_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launched = []
    monkeypatch.setattr("gn_det.cli.train.launch", lambda *a, **k: launched.append(k["device"]))
    for argv, key in [
        (["--config", "shapes/gn.yaml", "MODEL.DEVICE", "cuda"], "MODEL.DEVICE"),
        (["--config", "lazy/shapes_gn.py", "train.device=cuda"], "train.device"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            launch_from_args(argv, prog="gn-det train")
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert f"{key} is 'cuda', but no CUDA GPU is usable here" in err
        assert "--gpus all" in err and "driver" in err and f"add {key} cpu" in err
    # The shapes configs train on the CPU wherever they run.
    launch_from_args(["--config", "shapes/gn.yaml"], prog="gn-det train")
    launch_from_args(["--config", "lazy/shapes_gn.py"], prog="gn-det train")
    assert launched == ["cpu", "cpu"]
    # More processes than GPUs: refused before launch, not by an assert inside each rank.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit):
        launch_from_args(["--config", "shapes/gn.yaml", "--num-gpus", "4", "MODEL.DEVICE", "cuda"])
    assert "--num-gpus 4, but this machine shows 2 CUDA GPU(s)" in capsys.readouterr().err


def test_torchrun_joins_with_the_configs_backend_detectron2s_timeout_and_any_launchers_variables(
    monkeypatch,
):
    """Under torchrun (or a launcher that sets LOCAL_RANK and WORLD_SIZE but not
    LOCAL_WORLD_SIZE): gloo for a CPU config even on a GPU host, NCCL for a CUDA one, and
    detectron2's 30-minute timeout rather than NCCL's 10 minutes."""
    from detectron2.engine.launch import DEFAULT_TIMEOUT

    from gn_det.cli import train as engine

    calls = []
    monkeypatch.setattr(engine.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(
        engine.comm, "create_local_process_group", lambda n: calls.append({"local": n})
    )
    monkeypatch.setattr(engine.comm, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda rank: calls.append({"set_device": rank}))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    ran = []
    engine.launch_from_args(["--config", "shapes/gn.yaml", "--num-gpus", "2"], main_func=ran.append)
    assert calls == [
        {"backend": "gloo", "init_method": "env://", "timeout": DEFAULT_TIMEOUT},
        {"local": 2},
    ]
    assert len(ran) == 1 and ran[0].device == "cpu"

    calls.clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    engine.launch_from_args(
        ["--config", "shapes/gn.yaml", "MODEL.DEVICE", "cuda"], main_func=ran.append
    )
    assert calls == [
        {"set_device": 1},
        {"backend": "nccl", "init_method": "env://", "timeout": DEFAULT_TIMEOUT},
        {"local": 4},
    ]

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # 4 processes cannot be 3 per machine
    with pytest.raises(SystemExit) as exit_:
        engine.launch_from_args(["--config", "shapes/gn.yaml"], main_func=ran.append)
    assert exit_.value.code == 2


def test_train_help_says_config_file_takes_a_name():
    from gn_det.cli.train import argument_parser

    help_text = " ".join(argument_parser("gn-det train").format_help().split())
    assert "--config-file NAME a config: a path, else one of gn_det's configs" in help_text
    assert "detectron2's model zoo" in help_text and "path to config file" not in help_text


@pytest.mark.parametrize("local_world_size", [None, "2"])
def test_a_local_rank_past_the_processes_per_machine_is_one_line_and_exit_2(
    local_world_size, monkeypatch, capsys
):
    """LOCAL_RANK=3 with one process per machine (--num-gpus 1, no LOCAL_WORLD_SIZE) would put
    the model on cuda:3 and wrap DDP with device_ids=[0]."""
    from gn_det.cli import train as engine

    monkeypatch.setattr(engine, "_torchrun_worker", lambda *a: pytest.fail("joined"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if local_world_size:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    with pytest.raises(SystemExit) as exit_:
        engine.launch_from_args(["--config", "shapes/gn.yaml"], prog="gn-det train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    source = "LOCAL_WORLD_SIZE" if local_world_size else "--num-gpus, as LOCAL_WORLD_SIZE is not"
    assert err.startswith(f"gn-det train: error: LOCAL_RANK=3 is not below the processes per "
                          f"machine ({local_world_size or 1}, from {source}")
    assert len(err.splitlines()) == 1, err


def test_a_run_resumes_under_another_trainer_with_todays_optimizer_and_a_fresh_scaler(
    monkeypatch, gn_det_logs
):
    """Saved by TrainLoop with a foreach AdamW (a CPU run, an older torch), resumed under
    CUDAAMPTrainer with a fused one: no KeyError for the missing scaler, the state loads, the
    optimizer stays fused. And the other way round."""
    from gn_det.engine import CUDAAMPTrainer, TrainLoop

    _pretend_cuda(monkeypatch)
    data = _regression_data()

    def adamw(model, **kind):
        return torch.optim.AdamW(model.parameters(), lr=0.01, **kind)

    model = _Regression()
    saved_by = TrainLoop(model, data, adamw(model, foreach=True))
    saved_by.train(0, 2)
    state = saved_by.state_dict()
    assert "grad_scaler" not in state and state["optimizer"]["param_groups"][0]["foreach"]

    model = _Regression()
    resumed = CUDAAMPTrainer(
        model, data, adamw(model, fused=True), grad_scaler=torch.amp.GradScaler("cpu")
    )
    resumed.load_state_dict(state)
    assert resumed.iter == saved_by.iter
    group = resumed.optimizer.param_groups[0]
    assert group["fused"] and not group["foreach"]
    step = resumed.optimizer.state[model.linear.weight]["step"]
    assert float(step) == 2
    torch.testing.assert_close(
        resumed.optimizer.state[model.linear.weight]["exp_avg"],
        saved_by.optimizer.state[saved_by.model.linear.weight]["exp_avg"],
    )
    assert "starting with a fresh scaler" in gn_det_logs.text
    resumed.train(resumed.iter + 1, 4)  # and it trains on

    state = resumed.state_dict()
    assert "grad_scaler" in state
    model = _Regression()
    back = TrainLoop(model, data, adamw(model, foreach=False))
    back.load_state_dict(state)
    assert (
        back.optimizer.param_groups[0]["fused"] is None
        and not back.optimizer.param_groups[0]["foreach"]
    )
