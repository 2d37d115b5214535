"""Training runs for the studies: one ``gn-det train`` process per run, resumable.

A study (``lab/tools/small_batch_study.py``, ``lab/tools/transfer_study.py --detector``) is a
grid of training runs. Each runs in its own process (its own OUTPUT_DIR, logs, ``metrics.json``
and COCO evaluations), so runs are isolated and can go side by side; a run that finished is read
back instead of retrained, and one that was stopped resumes from its last checkpoint
(detectron2's ``--resume``), so an interrupted study goes on where it stopped.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = [
    "SMOKE_OPTS",
    "TRAIN_COMMAND",
    "evaluations",
    "finished_run",
    "logged_seconds",
    "threads_per_job",
    "train_run",
]

#: ``gn-det train`` in this interpreter (the installed package's, not a checkout's tools/).
TRAIN_COMMAND = (sys.executable, "-m", "gn_det.cli", "train")
_DONE = "run.json"
#: Overrides that make a shapes run tiny, for the studies' smoke tests: 64-pixel images, few
#: proposals, sampled regions and detections (the ROI heads are most of a small image's cost),
#: data loaded in the training process.
SMOKE_OPTS = [
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "64",
    "TEST.DETECTIONS_PER_IMAGE",
    "5",
    "DATALOADER.NUM_WORKERS",
    "0",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "20",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "16",
]


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of ``jobs`` runs side by side: the CPUs shared out, at least 1."""
    return max(1, (os.cpu_count() or 1) // jobs)


def evaluations(run_dir, dataset: Optional[str] = None) -> List[Dict[str, float]]:
    """Every COCO evaluation in ``run_dir/metrics.json``: ``iteration`` (iterations trained
    when it ran), ``box_ap``, ``mask_ap``.

    detectron2 logs a periodic evaluation at the index of the iteration just done (period - 1)
    and the final one at MAX_ITER; both become the number of iterations trained. Its
    COCOEvaluator reports NaN when the model predicted nothing; that is AP 0. Lines that are not
    JSON (a run killed mid-write) are skipped. With several test datasets detectron2 prefixes
    each result with its dataset's name: ``dataset`` picks one.
    """
    prefix = f"{dataset}/" if dataset else ""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    trained = [r["iteration"] + 1 for r in records if "total_loss" in r]
    last = max(trained, default=None)
    found = {}
    for record in records:
        if f"{prefix}bbox/AP" not in record:
            continue
        iteration = record["iteration"] if last is None else min(record["iteration"] + 1, last)
        ap = {
            key: float(record.get(name, math.nan))
            for key, name in (("box_ap", f"{prefix}bbox/AP"), ("mask_ap", f"{prefix}segm/AP"))
        }
        found[iteration] = {key: 0.0 if math.isnan(value) else value for key, value in ap.items()}
    return [{"iteration": i, **found[i]} for i in sorted(found)]


def finished_run(run_dir) -> Optional[dict]:
    """The record :func:`train_run` left for a run that finished, or None."""
    done = Path(run_dir) / _DONE
    return json.loads(done.read_text()) if done.is_file() else None


def train_run(
    config: str,
    opts: Sequence[str],
    run_dir,
    *,
    threads: Optional[int] = None,
    datasets: Sequence[str] = (),
    processes: int = 1,
    keep_checkpoints: bool = False,
) -> dict:
    """Train (and evaluate) ``config`` with ``opts`` into ``run_dir`` in a child process.

    Returns a record with ``returncode``, ``seconds``, ``evaluations`` and the final
    ``box_ap``/``mask_ap`` (NaN, with ``failure`` = the last line of its output, when the run
    stopped without evaluating: detectron2 stops on a non-finite loss, so divergence shows here).
    A run whose record says it finished is not run again. Output goes to ``run_dir/stdout.txt``.
    ``datasets``, if given, replace the config's test datasets: ``evaluations``, ``box_ap`` and
    ``mask_ap`` are then the first one's, and ``final`` holds each one's last evaluation.
    ``processes`` > 1 trains with ``--num-gpus processes`` (CPU processes on a CPU machine),
    ``threads`` each. A run that was stopped resumes from its last checkpoint (give ``opts`` a
    ``SOLVER.CHECKPOINT_PERIOD`` to have some); ``resumed_from`` is then the iterations it had,
    ``seconds`` the run's time over all its processes (:func:`logged_seconds`) and
    ``process_seconds`` this process's. A finished run keeps only its final weights, unless
    ``keep_checkpoints`` (to evaluate them afterwards).
    """
    run_dir = Path(run_dir)
    done = run_dir / _DONE
    if done.is_file():
        return finished_run(run_dir)
    datasets = list(datasets)
    test_opts = ["DATASETS.TEST", repr(tuple(datasets))] if datasets else []
    # A free port for the processes' rendezvous: detectron2's default is one per user, so two
    # multi-process runs at once (a --jobs 2 grid, a test beside a study) would collide on it.
    launch = ["--num-gpus", str(processes), "--dist-url", "auto"] if processes > 1 else []
    command = [
        *TRAIN_COMMAND,
        "--config",
        config,
        "--resume",
        *launch,
        *opts,
        *test_opts,
        "OUTPUT_DIR",
        str(run_dir),
    ]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = _checkpoint_iterations(run_dir)
    start = time.perf_counter()
    with open(run_dir / "stdout.txt", "a") as log:
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    record = {
        "config": config,
        "opts": list(opts),
        "processes": processes,
        "returncode": returncode,
        "seconds": seconds,
    }
    if resumed_from:
        record.update(
            resumed_from=resumed_from,
            process_seconds=seconds,
            seconds=max(seconds, logged_seconds(run_dir) or 0.0),
        )
    # One test dataset: detectron2 reports it unprefixed; several: each under its name.
    names = datasets if len(datasets) > 1 else [None]
    curves = {name: evaluations(run_dir, name) for name in names}
    record["evaluations"] = curves[names[0]]
    if len(datasets) > 1:
        record["final"] = {name: curve[-1] for name, curve in curves.items() if curve}
    final = record["evaluations"][-1] if returncode == 0 and record["evaluations"] else None
    if final is None:
        tail = (run_dir / "stdout.txt").read_text(errors="replace").strip().splitlines()[-1:]
        record.update(box_ap=math.nan, mask_ap=math.nan, failure=tail[0] if tail else "no output")
    else:
        record.update(box_ap=final["box_ap"], mask_ap=final["mask_ap"])
        for checkpoint in [] if keep_checkpoints else run_dir.glob("model_[0-9]*.pth"):
            checkpoint.unlink()
        done.write_text(json.dumps(record))
    return record


_LOG_LINE = re.compile(r"^\[(\d\d/\d\d \d\d:\d\d:\d\d)\] ")
_STARTED = re.compile(r"Starting training from iteration (\d+)")


def logged_seconds(run_dir) -> Optional[float]:
    """Seconds a run took over the processes that trained what it has, from the timestamps of
    detectron2's ``run_dir/log.txt`` (rank 0's; lines ``[mm/dd HH:MM:SS] ...``, whole seconds).

    Each process counts from its first line (``Rank of current process``) to its last; the sum
    starts at the last process that trained from iteration 0, so an attempt stopped before its
    first checkpoint, whose work was lost, is not counted. None without a log.
    """
    path = Path(run_dir) / "log.txt"
    if not path.is_file():
        return None
    processes = []  # [first, last, trained from scratch]
    for line in path.read_text(errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        # No year in the stamp: 2000 is a leap year, so 02/29 parses.
        stamp = datetime.datetime.strptime(f"2000/{match.group(1)}", "%Y/%m/%d %H:%M:%S")
        if "Rank of current process" in line or not processes:
            processes.append([stamp, stamp, False])
        processes[-1][1] = stamp
        started = _STARTED.search(line)
        if started:
            processes[-1][2] = started.group(1) == "0"
    fresh = [i for i, (_, _, scratch) in enumerate(processes) if scratch]
    total = datetime.timedelta()
    for first, last, _ in processes[fresh[-1] if fresh else 0 :]:
        total += (last - first) % datetime.timedelta(days=366)  # a run across New Year
    return total.total_seconds()


def _checkpoint_iterations(run_dir: Path) -> int:
    """Iterations done by the checkpoint a ``--resume`` would load from ``run_dir`` (0: none).

    detectron2 names its periodic checkpoints ``model_{iteration:07d}.pth`` (the index of the
    iteration just done) and records the latest in ``last_checkpoint``.
    """
    last = run_dir / "last_checkpoint"
    name = last.read_text().strip() if last.is_file() else ""
    stem = name.removeprefix("model_").removesuffix(".pth")
    return int(stem) + 1 if stem.isdigit() else 0
