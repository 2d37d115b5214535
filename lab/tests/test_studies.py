"""The study scripts run (smoke mode), so they cannot rot. The end-to-end ones are marked
``study``: ``make lab-test`` runs them, ``make test`` (CI) leaves them out (lab/README.md)."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

TOOLS = Path(__file__).resolve().parent.parent / "tools"  # lab/tools


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_study_smoke(tmp_path, capsys):
    out = tmp_path / "fidelity.png"
    assert _tool("transfer_study").main(["--smoke", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    for method in (
        "copy",
        "stats",
        "calibrate 2",
        "calibrate 2 (output objective)",
        "calibrate 4 (local)",
        "calibrate 4 + distill 1",
    ):
        assert f"| shared statistics | {method} |" in table
        assert f"| per-image photometrics | {method} |" in table
    assert Image.open(out).size[0] == 900  # one panel per regime


@pytest.mark.study
def test_small_batch_study_smoke(tmp_path, capsys):
    study = _tool("small_batch_study")
    out = tmp_path / "study"
    argv = [
        "--smoke",
        "--output-dir",
        str(out),
        "--norms",
        "gn",
        "frozenbn",
        "--batches",
        "1",
        "2",
        "--jobs",
        "2",
    ]
    assert study.main(argv) == 0
    table = capsys.readouterr().out
    # 4 images seen in every cell; LR scaled linearly from the config's rate at 2 images.
    assert "| GN | 1 | 1 | 4 | 0.00025 | 1 |" in table
    assert "| GN | 2 | 1 | 2 | 0.0005 | 1 |" in table
    assert "| no norm (FrozenBN) | 2 | 1 | 2 | 0.001 | 1 |" in table  # its own config's LR
    assert Image.open(out / "small_batch.png").size == (900, 360)
    cells = (
        "gn_b1_lr0.0005_s1",
        "gn_b2_lr0.0005_s1",
        "frozenbn_b1_lr0.001_s1",
        "frozenbn_b2_lr0.001_s1",
    )
    for cell in cells:
        record = json.loads((out / cell / "run.json").read_text())
        # Chosen on shapes_val, reported on the held-out shapes_test too: both evaluated.
        assert set(record["final"]) == {"shapes_val", "shapes_test"}
        assert record["box_ap"] == record["final"]["shapes_val"]["box_ap"]
    # Finished cells are read back, not retrained; the plot is not replaced without --force.
    before = (out / cells[0] / "metrics.json").stat().st_mtime_ns
    assert study.main(argv + ["--force"]) == 0
    assert (out / cells[0] / "metrics.json").stat().st_mtime_ns == before
    # --report-only trains nothing: a cell that never ran is named and left out.
    capsys.readouterr()
    assert study.main(argv + ["--force", "--report-only", "--batches", "1", "2", "4"]) == 0
    captured = capsys.readouterr()
    assert (
        "gn at 4, LR 0.0005, seed 1: not run" in captured.err and "| GN | 4 |" not in captured.out
    )
    assert not (out / "gn_b4_lr0.0005_s1").exists()
    # An LR sweep with two seeds reports mean ± half the spread, grouped per LR.
    assert (
        study.main(argv + ["--force", "--report-only", "--batches", "2", "--seeds", "1", "2"]) == 0
    )
    assert "| GN | 2 | 1 | 2 | 0.0005 | 1 |" in capsys.readouterr().out  # seed 2 never ran


@pytest.mark.study
def test_small_batch_study_syncbn_and_high_resolution_cells(tmp_path, capsys):
    """A SyncBN cell: 2 gloo processes of 1 image, one BN batch of 2; LR for the 2 images. It
    runs while detectron2's default rendezvous port is taken (by another multi-process run).
    --data shapes_hr: the cells train on shapes_hr_train and report its val and test splits."""
    import socket
    from urllib.parse import urlparse

    from detectron2.engine import default_argument_parser

    out = tmp_path / "study"
    argv = [
        "--smoke",
        "--output-dir",
        str(out),
        "--norms",
        "syncbn",
        "bn",
        "--batches",
        "1",
        "--processes",
        "2",
        "--data",
        "shapes_hr",
        "--lr-scaling",
        "sqrt",
        "--jobs",
        "2",
    ]
    default_port = urlparse(default_argument_parser().parse_args([]).dist_url).port
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", default_port))
            taken.listen()
        except OSError:
            pass  # already taken, by a study running on this machine
        assert _tool("small_batch_study").main(argv) == 0
    table = capsys.readouterr().out
    assert (
        "| SyncBN | 1 | 2 | 2 | 0.0005 | 1 |" in table
    )  # one BN batch of 2 images: the config's LR
    assert "| BN | 1 | 1 | 4 | 0.000353553 | 1 |" in table  # 5e-4 / sqrt(2)
    run = out / "hr600_syncbn2_b1_lr0.0005_sqrt_s1"
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    log = (run / "log.txt").read_text()
    assert "World size: 2" in log and "NaiveSyncBatchNorm" in log
    record = json.loads((out / "hr600_bn_b1_lr0.0005_sqrt_s1" / "run.json").read_text())
    assert set(record["final"]) == {"shapes_hr_val", "shapes_hr_test"}
    assert "('shapes_hr_train',)" in record["opts"]


def test_small_batch_schedule_is_fixed_in_images():
    study = _tool("small_batch_study")
    config = study.config_schedule("gn")
    assert config == {
        "batch": 2,
        "base_lr": 0.0005,
        "images": 3600,
        "warmup_images": 200,
        "step_fractions": [1450 / 1800],
    }
    assert study.schedule(config, 0.0005, 8, 3600) == [
        "SOLVER.IMS_PER_BATCH",
        "8",
        "SOLVER.BASE_LR",
        "0.002",
        "SOLVER.MAX_ITER",
        "450",
        "SOLVER.WARMUP_ITERS",
        "25",
        "SOLVER.STEPS",
        "(362,)",
    ]
    assert study.schedule(config, 0.001, 1, 3600)[3::2] == ["0.0005", "3600", "200", "(2900,)"]
    # Square-root scaling (Adam's rule): 4x the batch, 2x the LR.
    assert study.schedule(config, 0.0005, 8, 3600, "sqrt")[3] == "0.001"
    # Two LR drops stay two; a drop that would land on step 0 is dropped.
    two = {**config, "step_fractions": [0.5, 0.75]}
    assert study.schedule(two, 0.0005, 2, 400)[-1] == "(100,150,)"
    assert study.schedule(two, 0.0005, 2, 2)[-1] == "()"


def test_small_batch_best_lr_is_chosen_on_val():
    study = _tool("small_batch_study")
    runs = [
        {
            "norm": "bn",
            "batch": 2,
            "processes": 1,
            "base_lr": lr,
            "seed": 1,
            "seconds": 60.0,
            "box_ap": val,
            "mask_ap": val,
            "final": {
                "shapes_val": {"box_ap": val, "mask_ap": val},
                "shapes_test": {"box_ap": test, "mask_ap": test},
            },
        }
        for lr, val, test in (
            (0.001, 40.0, 50.0),
            (0.0005, 45.0, 44.0),
            (0.002, float("nan"), float("nan")),
        )
    ]
    rows = study.summarize(runs)
    assert [r["base_lr"] for r in rows] == [0.0005, 0.001, 0.002]
    best = study.best_rows(rows)
    assert (
        len(best) == 1
        and best[0]["base_lr"] == 0.0005
        and best[0]["shapes_test/box_ap"] == (44.0, 0.0)
    )


def test_small_batch_bn_statistics_points_are_seed_means_of_the_evaluated_cells(
    tmp_path, monkeypatch
):
    """--bn-statistics: lab/tools/bn_statistics_study.py's JSON, matched to the cells by run
    folder."""
    study = _tool("small_batch_study")
    monkeypatch.chdir(tmp_path)
    cells = [
        {
            "norm": "bn",
            "batch": 1,
            "processes": 1,
            "seed": seed,
            "run_dir": str(tmp_path / f"bn_b1_s{seed}"),
        }
        for seed in (1, 2)
    ] + [{"norm": "bn", "batch": 8, "processes": 1, "seed": 1, "run_dir": "bn_b8_s1"}]
    found = {
        str(tmp_path / "bn_b1_s1"): {
            "modes": {
                "running": {"shapes_test": [60.0, 50.0]},
                "batch": {"shapes_test": [71.0, 60.0]},
                "precise": {"shapes_val": [1.0, 1.0]},
            }
        },
        "bn_b1_s2": {
            "modes": {"batch": {"shapes_test": [73.0, 62.0]}}
        },  # relative, the same folder
        "elsewhere": {"modes": {"batch": {"shapes_test": [0.0, 0.0]}}},
    }  # not a cell
    # The running mode is the cell's own evaluation and precise has no shapes_test: left out.
    assert study.statistics_points(cells, found, "shapes_test") == {
        ("bn", 1, "batch"): [(1, 72.0, 61.0)]
    }


@pytest.mark.study
def test_benchmark_norms_smoke(tmp_path, gpu_host):
    """All four parts run on 64-pixel images, one round: R-50 FrozenBN (4conv1fc head) and GN;
    on a pretend GPU host, where the 2-process part must still use gloo for --device cpu."""
    import json
    import subprocess
    import sys

    results, plot = tmp_path / "results.json", tmp_path / "norms.png"
    command = [
        sys.executable,
        str(TOOLS / "benchmark_norms.py"),
        "--smoke",
        "--variants",
        "gn",
        "--json",
        str(results),
        "--output",
        str(plot),
        "--profile",
        "gn",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=gpu_host)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "naiveSyncBN / GN step time:" in done.stdout
    assert "| gn: op | self time (s) | share |" in done.stdout and "aten::" in done.stdout
    data = json.loads(results.read_text())
    assert set(data["timing"]) == set(data["memory"]) == {"frozenbn_4conv1fc", "gn"}
    assert all(t["step_2"] > 0 and t["inference"] > 0 for t in data["timing"].values())
    # GN keeps its norm inputs for backward; FrozenBN's affine does not.
    assert data["memory"]["gn"]["saved_mib"] > data["memory"]["frozenbn_4conv1fc"]["saved_mib"]
    assert set(data["distributed"]) == {"gn", "naive_syncbn"}
    assert set(data["layer"]) == {"res2", "res3", "res4", "res5"}
    assert Image.open(plot).size == (1280, 360)
    # Outputs are not replaced without --force.
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600, env=gpu_host)
    assert refused.returncode == 2 and "--force" in refused.stderr


@pytest.mark.study
def test_transfer_study_detector_smoke(tmp_path, capsys):
    """Zero-shot transfers and the fine-tuning runs, end to end on 64-pixel images."""
    import torch
    from detectron2.modeling import build_model

    from gn_det.cli.config_files import load_config, resolve_config_name

    cfg = load_config(resolve_config_name("shapes/bn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": build_model(cfg).state_dict()}, teacher)
    out, plot = tmp_path / "study", tmp_path / "finetune.png"
    argv = [
        "--smoke",
        "--detector",
        str(teacher),
        "--output-dir",
        str(out),
        "--output",
        str(plot),
        "--jobs",
        "2",
        "--runs",
        "distill",
        "bn",
    ]  # the other runs differ only in options
    assert _tool("transfer_study").main(argv) == 0
    table = capsys.readouterr().out
    for model in (
        "BN teacher",
        "copy",
        "stats",
        "calibrate 2",
        "calibrate 2 (output objective)",
        "calibrate 2 + distill 1",
        "stats + distill 1 (GN affine only)",
        "stats + distill 1",
    ):
        assert f"| {model} |" in table
    for run in ("GN from calibrate 2 + distill 1", "BN teacher at 2 images"):
        assert f"| {run} | 1 |" in table and f"| {run} | 2 |" in table  # evaluated every iteration
    assert "GN from copy" not in table
    assert Image.open(plot).size == (1000, 400)
    assert (out / "zero_shot" / "calibrate_2.pth").is_file()


@pytest.mark.study
def test_benchmark_recompute_runs_and_recompute_keeps_less_for_backward():
    import subprocess
    import sys

    command = [
        sys.executable,
        str(TOOLS / "benchmark_recompute.py"),
        "--config",
        "shapes/gn.yaml",
        "--size",
        "64",
        "--batch",
        "1",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]]
        for line in done.stdout.splitlines()
        if line.split() and line.split()[0].endswith(("_s", "_mib"))
    }
    assert set(rows) == {"forward_s", "step_s", "saved_mib", "peak_rss_growth_mib"}
    off, on, ratio = rows["saved_mib"]
    assert 0 < on < off and ratio < 1
    assert all(v >= 0 for v in rows["peak_rss_growth_mib"][:2])


@pytest.mark.study
def test_profile_train_step_smoke(tiny_env, capsys):
    from models import TINY

    argv = ["--config", "shapes/gn_demo.yaml", "--iters", "1", "--autocast", "--ops", "5", *TINY]
    assert _tool("profile_train_step").main(argv) == 0
    out = capsys.readouterr().out
    assert "s per step" in out and "(bf16 autocast)" in out
    for part in (
        "backward",
        "forward: backbone + FPN",
        "forward: RPN",
        "forward: mask head",
        "data",
    ):
        assert part in out
    # The op table: the 5 ops of most self time.
    table = out.split("torch.profiler, 1 steps:")[1]
    assert table.count("aten::") + table.count("torchvision::") >= 1 and "Self CPU" in table


@pytest.mark.study
def test_train_run_resumes_a_stopped_run_from_its_last_checkpoint(tiny_env, tmp_path, monkeypatch):
    """A run stopped after a checkpoint goes on from there; once finished it keeps model_final
    only."""
    import shutil

    from gn_det_lab.runs import SMOKE_OPTS, finished_run, train_run

    monkeypatch.setenv(
        "PYTHONPATH", tiny_env["PYTHONPATH"]
    )  # evaluated on shapes_tiny_val: 2 images
    run = tmp_path / "run"
    opts = [
        *SMOKE_OPTS,
        "SOLVER.IMS_PER_BATCH",
        "1",
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.STEPS",
        "()",
        "TEST.EVAL_PERIOD",
        "0",
        "DATASETS.TEST",
        "('shapes_tiny_val',)",
    ]
    first = train_run("shapes/gn.yaml", [*opts, "SOLVER.MAX_ITER", "2"], run, threads=1)
    assert first["returncode"] == 0 and "resumed_from" not in first
    # Make it a run of 4 iterations stopped after the checkpoint of iteration 2 (index 1).
    shutil.copy(run / "model_final.pth", run / "model_0000001.pth")
    (run / "last_checkpoint").write_text("model_0000001.pth")
    (run / "run.json").unlink()
    second = train_run(
        "shapes/gn.yaml",
        [*opts, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100"],
        run,
        threads=1,
    )
    assert second["returncode"] == 0 and second["resumed_from"] == 2
    assert second["seconds"] >= second["process_seconds"]  # both processes' time, from log.txt
    assert "Starting training from iteration 2" in (run / "log.txt").read_text()
    assert second["evaluations"][-1]["iteration"] == 4
    assert finished_run(run) == second
    assert not list(run.glob("model_0*.pth")) and (run / "model_final.pth").is_file()


def test_logged_seconds_counts_the_processes_that_trained_what_the_run_has(tmp_path):
    """A run's time is summed over its processes from the last that started at iteration 0: an
    attempt stopped before its first checkpoint is lost work, a resumed process adds its time."""
    from gn_det_lab.runs import logged_seconds

    assert logged_seconds(tmp_path) is None
    (tmp_path / "log.txt").write_text(
        "[12/31 22:00:00] detectron2 INFO: Rank of current process: 0. World size: 1\n"
        "[12/31 22:00:05] d2.engine.train_loop INFO: Starting training from iteration 0\n"
        "[12/31 22:10:00] d2.utils.events INFO:  iter: 19\n"  # stopped, no checkpoint: lost
        "[12/31 23:00:00] detectron2 INFO: Rank of current process: 0. World size: 1\n"
        "[12/31 23:00:02] d2.engine.train_loop INFO: Starting training from iteration 0\n"
        "a line without a time stamp\n"
        "[12/31 23:50:00] d2.utils.events INFO:  iter: 899\n"  # 50 minutes, then stopped
        "[01/01 00:30:00] detectron2 INFO: Rank of current process: 0. World size: 1\n"
        "[01/01 00:30:01] d2.engine.train_loop INFO: Starting training from iteration 900\n"
        "[01/01 00:50:00] d2.evaluation.testing INFO: copypaste: 1.0\n"
    )  # 20 minutes, over New Year
    assert logged_seconds(tmp_path) == 70 * 60


@pytest.mark.study
def test_gpu_smoke_runs_every_check_on_the_cpu(tmp_path):
    """lab/tools/gpu_smoke.py, the script for the day a GPU is lent, at CPU size: every check
    passes (the 2-process one on gloo), the table and JSON are written."""
    import json
    import subprocess
    import sys

    results = tmp_path / "smoke.json"
    done = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "gpu_smoke.py"),
            "--device",
            "cpu",
            "--small",
            "--iterations",
            "2",
            "--json",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = json.loads(results.read_text())["rows"]
    assert [r["check"] for r in rows] == [
        "train_amp",
        "train_amp_adamw_clip",
        "train_amp_recompute",
        "train_amp_weight_standardization",
        "memory_1_image",
        "ddp_2_processes",
        "calibrate_distill",
        "resume",
        "export",
        "fold",
    ]
    assert {r["status"] for r in rows} == {"PASS"}, rows
    assert "| ddp_2_processes | PASS |" in done.stdout and "gloo" in done.stdout


@pytest.mark.study
def test_backbone_study_smoke(tmp_path, capsys):
    """lab/tools/backbone_study.py end to end, tiny: pretrain BN and GN on the proxy, distill the BN
    backbone, fine-tune from five starts, intervals on each checkpoint, the report."""
    study = _tool("backbone_study")
    out = tmp_path / "study"
    assert study.main(["pretrain", "--smoke", "--output-dir", str(out), "--jobs", "2"]) == 0
    for norm in ("bn", "gn"):
        result = json.loads((out / f"pretrain_{norm}" / "result.json").read_text())
        assert result["norm"] == norm.upper() and 0 <= result["val_miou"] <= 1
        assert (out / f"pretrain_{norm}" / "backbone.pkl").is_file()
    assert (
        study.main(
            [
                "finetune",
                "--smoke",
                "--output-dir",
                str(out),
                "--starts",
                "distill",
                "gn_pretrained",
                "frozenbn_gn",
                "stats",
                "stats_ws",
                "--freeze-at",
                "2",
                "--large-checkpoints",
                "2",
                "--jobs",
                "2",
            ]
        )
        == 0
    )
    assert (out / "distilled_bn_to_gn.pkl").is_file() and len(
        list((out / "proxy_images").glob("*.png"))
    ) == 32
    capsys.readouterr()
    plot, results = tmp_path / "route.png", tmp_path / "route.json"
    assert (
        study.main(
            ["report", "--output-dir", str(out), "--plot", str(plot), "--json", str(results)]
        )
        == 0
    )
    table = capsys.readouterr().out
    for start in (
        "BN-pretrained, FrozenBN backbone, GN FPN and heads (stock detectron2)",
        "BN-pretrained, converted to GN: stats",
        "BN-pretrained, converted to GN: stats + distill",
        "BN-pretrained, converted to GN + WS: stats",
        "GN-pretrained",
    ):
        assert f"| shapes | {start} | 2 | 1 |" in table
    ws_config = (out / "stats_ws_b1_i2_lr1x_s1" / "config.yaml").read_text()
    assert "WEIGHT_STANDARDIZATION: true" in ws_config and "TRANSFER: stats" in ws_config
    written = json.loads(results.read_text())
    assert (
        written["columns"][1] == "start" and len(written["rows"]) == 5
    )  # lab/tools/render_results.py's format
    assert written["command"].startswith(
        "lab/tools/backbone_study.py pretrain --smoke"
    )  # every stage, in order
    assert "; lab/tools/backbone_study.py finetune --smoke" in written["command"]
    assert written["command"].endswith(str(results))
    assert all(r["box"]["low"] <= r["box"]["ap"] <= r["box"]["high"] for r in written["data"])
    pretraining = json.loads((tmp_path / "route_pretrain.json").read_text())
    assert [row[0] for row in pretraining["rows"]] == [
        "R-18, BN",
        "R-18, GN",
    ] and "| R-18, GN | 4 | 8 |" in table
    assert Image.open(plot).size[0] > 0
    assert study.main(["report", "--output-dir", str(out), "--plot", str(plot)]) == 2  # no --force
    # The paired route on the cells above (the smoke's 2-iteration cells are its own sweep):
    # every seed's last checkpoints on the large split with their resamples, the difference.
    for start in ("frozenbn_gn", "stats"):
        assert "FREEZE_AT: 2" in (out / f"{start}_b1_i2_lr1x_s1" / "config.yaml").read_text()
    capsys.readouterr()
    paired, paired_json = tmp_path / "paired.png", tmp_path / "paired.json"
    pair = ["--output-dir", str(out), "--lr-from-sweep", "2", "--smoke"]
    assert study.main(["paired", *pair, "--plot", str(paired), "--json", str(paired_json)]) == 0
    table = capsys.readouterr().out
    assert "| BN-pretrained, converted to GN: stats | **1** (1: " in table
    result = json.loads(paired_json.read_text())["data"]
    assert sorted(result["starts"]["stats"]["seeds"]) == ["1"]
    for kind in ("box", "mask"):
        d = result["difference"][kind]
        assert d["low"] <= d["high"] and sorted(d["per_seed"]) == ["1"]
        runs = [result["starts"][s]["seeds"]["1"]["final"][kind] for s in ("frozenbn_gn", "stats")]
        assert d["per_seed"]["1"] == pytest.approx(runs[1]["ap"] - runs[0]["ap"])
        assert len(runs[0]["samples"]) == len(runs[1]["samples"]) > 0
    assert Image.open(paired).size[0] > 0
    with pytest.raises(SystemExit, match="has not finished"):  # no sweep of 4 iterations
        study.main(["paired", "--output-dir", str(out), "--lr-from-sweep", "4"])


@pytest.mark.study
def test_fold_finetune_smoke(gn_run, tiny_env, tmp_path, monkeypatch):
    """lab/tools/fold_finetune.py on a 2-iteration GN run: folded by gn-det convert, fine-tuned
    2 iterations with labels, every model evaluated with paired shares of the GN model's AP."""
    monkeypatch.setenv("PYTHONPATH", tiny_env["PYTHONPATH"])  # children register shapes_tiny
    tool = _tool("fold_finetune")
    out, results = tmp_path / "ft", tmp_path / "ft.json"
    args = ["--gn-run", str(gn_run[0]), "--output-dir", str(out), "--smoke", "--json", str(results)]
    args += ["--dataset", "shapes_tiny_val", "--val-dataset", "shapes_tiny_val", "--control"]
    assert tool.main(args) == 0
    written = json.loads(results.read_text())
    models = written["data"]["models"]
    assert [m.get("iterations") for m in models] == [None, 0, 1, 2, 2, None]
    assert models[4]["model"] == "GN, fine-tuned with labels (control)"
    assert "MODEL.NORM_CONVERSION.FOLDED True" in " ".join(written["data"]["fine_tuning"]["opts"])
    assert "FOLDED" not in " ".join(written["data"]["control"]["opts"])
    assert written["rows"][-1][0] == "folded and fine-tuned / GN fine-tuned the same"
    for model in models[1:5]:
        for kind in ("box", "mask"):
            share, reference = model["kept"][kind], models[0][kind]["ap"]
            if reference:
                assert share["kept"] == pytest.approx(model[kind]["ap"] / reference)
    assert written["data"]["minutes"]["convert"] > 0 and f"--json {results}" in written["command"]
    assert tool.main(args) == 2  # the results file exists: --force replaces it


@pytest.mark.study
def test_fold_study_smoke(gn_run, tmp_path, capsys):
    """lab/tools/fold_study.py: accuracy stage by stage on a 2-iteration GN run, timing of the
    variants, the report."""
    run = gn_run[0]
    accuracy, timing, plot = (
        tmp_path / "accuracy.json",
        tmp_path / "timing.json",
        tmp_path / "fold.png",
    )
    tool = _tool("fold_study")  # in this process, where tiny_env registered shapes_tiny too
    assert (
        tool.main(
            [
                "accuracy",
                "--smoke",
                "--run",
                str(run),
                "--dataset",
                "shapes_tiny_val",
                "--plans",
                "all folded",
                "ROI heads keep GN",
                "--json",
                str(accuracy),
            ]
        )
        == 0
    )
    assert tool.main(["timing", "--smoke", "--json", str(timing)]) == 0
    rows = json.loads(accuracy.read_text())["rows"]
    assert [(r["plan"], r["stage"]) for r in rows] == [
        ("GN (as trained)", "GN"),
        ("all folded", "affine from statistics"),
        ("all folded", "+ distill 1"),
        ("all folded", "+ fold (deployed)"),
        ("ROI heads keep GN", "affine from statistics"),
        ("ROI heads keep GN", "+ distill 1"),
        ("ROI heads keep GN", "+ fold (deployed)"),
    ]
    assert rows[3]["layers"] == {"folded into the conv": rows[3]["layers"]["folded into the conv"]}
    assert "kept as GN" in rows[6]["layers"]
    variants = {(r["model"], r["variant"]) for r in json.loads(timing.read_text())["rows"]}
    assert ("R-50-FPN 1333x800", "GN, all folded") in variants and (
        "shapes R-18-FPN 256x256",
        "FrozenBN folded",
    ) in variants
    report = [
        "report",
        str(accuracy),
        "--timing",
        str(timing),
        "--plot",
        str(plot),
        "--results",
        str(tmp_path / "folding"),
        "--commands",
        "the commands",
    ]
    capsys.readouterr()
    assert tool.main(report) == 0
    out = capsys.readouterr().out
    assert "| all folded | + fold (deployed) |" in out and "/ FrozenBN folded (medians)" in out
    assert "(one round)" in out  # --smoke times one round: no interquartile range
    assert Image.open(plot).size[0] > 0
    for kind, count in (
        ("accuracy", 7),
        ("timing", len(variants)),
    ):  # lab/tools/render_results.py's format
        result = json.loads((tmp_path / f"folding_{kind}.json").read_text())
        assert result["command"] == "the commands" and len(result["rows"]) == count
        assert all(len(row) == len(result["columns"]) for row in result["rows"])
    assert tool.main(report) == 2 and "pass --force" in capsys.readouterr().err


def test_fold_study_report_draws_both_models_from_the_committed_results(tmp_path, capsys):
    """fold_study.py report --from-results lab/results/folding: both models in both panels, one
    colour each, time with its interquartile range over rounds, the axes holding every bar; a
    timing of one round (--smoke) draws too."""
    from matplotlib.colors import to_hex

    tool = _tool("fold_study")
    prefix = TOOLS.parent / "results" / "folding"
    plot = tmp_path / "folding.png"
    argv = ["report", "--from-results", str(prefix), "--plot", str(plot)]
    assert tool.main(argv) == 0 and Image.open(plot).size[0] > 0
    assert "| gn_pretrained_b1_i3600_lr1x_s1 (shapes_large_test) | all folded |" in (
        capsys.readouterr().out
    )
    runs = json.loads(Path(f"{prefix}_accuracy.json").read_text())["data"]
    timing = json.loads(Path(f"{prefix}_timing.json").read_text())["data"]
    assert len(runs) == 2
    figure = tool.figure(runs, timing)
    assert len(figure.axes) == 2
    colours = []
    for ax in figure.axes:
        bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert [c.get_label() for c in bars] == [
            "demo (GN from scratch, 2 images per batch)",
            "GN-pretrained, fine-tuned at 1 image per batch",
        ]
        assert [len(c.lines[0].get_xdata()) for c in bars] == [4, 2]  # GN and deployed plans
        colours.append([to_hex(c.lines[0].get_color()) for c in bars])
        (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
        for container in bars:
            assert container.has_xerr and container.has_yerr
            for lines in container.lines[2]:
                for segment in lines.get_segments():
                    assert left < segment[:, 0].min() and segment[:, 0].max() < right
                    assert bottom < segment[:, 1].min() and segment[:, 1].max() < top
        assert right - left < 0.3 and top - bottom < 40  # zoomed to the points
    assert colours[0] == colours[1] and len(set(colours[0])) == 2
    one_round = json.loads(json.dumps(timing))
    for row in one_round["rows"]:
        row["round_ratios"] = row["round_ratios"][:1]
    assert len(tool.figure(runs, one_round).axes) == 2


@pytest.mark.study
def test_ws_study_paired_smoke(tiny_env, tmp_path, capsys, monkeypatch):
    """lab/tools/ws_study.py paired on a 2-iteration GN and GN+WS run (seed 1, a checkpoint each
    iteration, named as the small-batch study names its cells): both runs' last two checkpoints
    evaluated with their image resamples, the paired difference, the table, the plot."""
    from gn_det_lab.runs import train_run
    from models import TINY

    monkeypatch.setenv("PYTHONPATH", tiny_env["PYTHONPATH"])  # children register shapes_tiny
    import concurrent.futures

    out = tmp_path / "ws"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two processes, side by side
        records = list(pool.map(
            lambda norm: train_run(f"shapes/{norm}.yaml", TINY + ["SOLVER.CHECKPOINT_PERIOD", "1"],
                                   out / f"{norm}_b2_lr0.0005_s1", threads=1,
                                   keep_checkpoints=True), ("gn", "gn_ws")))
    assert [r["returncode"] for r in records] == [0, 0]
    assert "WEIGHT_STANDARDIZATION: true" in (out / "gn_ws_b2_lr0.0005_s1" / "config.yaml"
                                              ).read_text()
    capsys.readouterr()
    plot, results = tmp_path / "ws.png", tmp_path / "ws.json"
    argv = ["paired", "--output-dir", str(out), "--dataset", "shapes_tiny_val", "--plot",
            str(plot), "--json", str(results), "--resamples", "20"]
    assert _tool("ws_study").main(argv) == 0
    table = capsys.readouterr().out
    assert "| difference, paired: GN+WS − GN |" in table
    data = json.loads(results.read_text())["data"]
    assert data["seeds"] == [1]
    for kind in ("box", "mask"):
        runs = [data["norms"][n]["1"]["final"][kind] for n in ("gn", "gn_ws")]
        d = data["difference"][kind]
        assert d["per_seed"]["1"] == pytest.approx(runs[1]["ap"] - runs[0]["ap"])
        assert d["low"] <= d["high"] and len(runs[0]["samples"]) == 20
    assert Image.open(plot).size[0] > 0


def test_ws_study_zero_shot_table_keeps_the_sources_ap_as_reference():
    rows = _tool("ws_study").zero_shot_rows({
        norm: [
            {"method": "BN teacher", "box_ap": 50.0, "mask_ap": 40.0, "cosines": {"p2": 1.0}},
            {"method": "stats", "box_ap": ap, "mask_ap": 10.0, "cosines": {"p2": 0.9, "p3": 0.5}},
        ]
        for norm, ap in (("gn", 25.0), ("gn_ws", 5.0))
    })
    assert rows[0] == ["BN source", "50.0 / 40.0", "", "", ""]
    assert rows[1] == ["stats", "25.0 / 10.0 (50%)", "0.500–0.900", "5.0 / 10.0 (10%)",
                       "0.500–0.900"]


@pytest.mark.study
def test_benchmark_ws_smoke(tmp_path, capsys):
    """lab/tools/benchmark_ws.py on 64-pixel images, two rounds: the three variants timed and
    their saved bytes measured, the results file written."""
    results = tmp_path / "ws_cost.json"
    assert _tool("benchmark_ws").main(["--smoke", "--repeats", "2", "--threads", "1",
                                       "--output", str(results)]) == 0
    data = json.loads(results.read_text())
    assert [row[0] for row in data["rows"]] == ["gn", "gn_ws", "gn_ws_parametrize"]
    measured = data["data"]
    assert measured["gn"]["step_ratio"]["median"] == 1.0
    assert all(len(v["samples"]["step"]) == 2 and v["step"] > 0 for v in measured.values())
    # The standardised weights are kept for backward (not parameters), the more so by autograd.
    saved = {k: v["memory_saved_mib"] for k, v in measured.items()}
    assert saved["gn"] < saved["gn_ws"] < saved["gn_ws_parametrize"], saved
    assert data["command"].startswith("lab/tools/benchmark_ws.py --smoke")
