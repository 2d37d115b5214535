"""``gn-det train`` (and ``tools/train_net.py``): detectron2's training command line on
gn_det's :class:`~gn_det.engine.Trainer`, single- or multi-GPU, multi-node, or under torchrun.

Every input is checked before a process starts (:func:`launch_from_args`): a bad config,
override or dataset is one line on stderr and exit code 2, and so is a weights file that cannot
be read or does not fit (loaded once into a CPU copy of the model to find out).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys

import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import Checkpointer
from ..config import ConfigError
from ..engine import Trainer, create_ddp_model, training_loop_class
from ..report import audit_norms
from .config_files import UnsafeConfigError, load_config, merge_overrides, resolve_config_name

__all__ = [
    "argument_parser",
    "check_device",
    "launch",
    "launch_from_args",
    "lazy_main",
    "main",
    "setup",
]

logger = logging.getLogger(__name__)


def argument_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """detectron2's training flags plus ``--config NAME``, ``--allow-unsafe-yaml``, ``--debug``."""
    parser = default_argument_parser(epilog="Example: gn-det train --config gn_mask_rcnn.yaml "
                                     "--num-gpus 8")
    parser.prog = prog or parser.prog
    config_file = parser._option_string_actions["--config-file"]  # detectron2's: a path
    config_file.metavar = "NAME"
    config_file.help = ("a config: a path, else one of gn_det's configs (gn_mask_rcnn.yaml, "
                        "shapes/gn.yaml; .yaml may be left off), else one of detectron2's model "
                        "zoo (COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml), from any "
                        "directory")
    parser.add_argument("--config", metavar="NAME", default="",
                        help="the same as --config-file")
    parser.add_argument("--allow-unsafe-yaml", action="store_true",
                        help="accept configs that need yaml.unsafe_load (they can run code when "
                        "loaded)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a bad config or input")
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from ``args`` (file, overrides), frozen; detectron2's default_setup (logs, output)."""
    cfg = load_config(args.config_file, allow_unsafe_yaml=args.allow_unsafe_yaml)
    merge_overrides(cfg, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gn_det")
    return cfg


def main(args: argparse.Namespace):
    """Train (or evaluate with ``--eval-only``) in this process; returns the eval results."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                    resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _lazy_test(cfg, model):
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                                   instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def lazy_main(args: argparse.Namespace):
    """Train or evaluate a LazyConfig (``.py``) config, as detectron2's
    ``lazyconfig_train_net.py`` does, with gn_det's norm audit, loading and CPU DDP."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import hooks
    from detectron2.engine.defaults import default_writers

    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="gn_det")

    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    world_size = comm.get_world_size()
    batch = cfg.dataloader.train.get("total_batch_size", world_size)
    audit_norms(model, max(batch // world_size, 1), world_size)
    if args.eval_only:
        Checkpointer(model).load(cfg.train.init_checkpoint)
        return _lazy_test(cfg, create_ddp_model(model))

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    _check_lazy_datasets(cfg)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    # detectron2's new baselines enable AMP, which its AMPTrainer supports on CUDA only.
    loop_class = training_loop_class(cfg.train.amp.enabled, cfg.train.device)
    trainer = loop_class(model, train_loader, optimizer)
    checkpointer = Checkpointer(model, cfg.train.output_dir, trainer=trainer)
    main_process = comm.is_main_process()
    writers = default_writers(cfg.train.output_dir, cfg.train.max_iter)
    saver = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        saver if main_process else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: _lazy_test(cfg, model)),
        hooks.PeriodicWriter(writers, period=cfg.train.log_period) if main_process else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def _check_lazy_datasets(cfg) -> None:
    """Missing COCO files: a clear error before training (as for YAML configs)."""
    from ..data import check_dataset_files

    for split in ("train", "test"):
        dataset = cfg.dataloader.get(split, {}).get("dataset", {})
        names = dataset.get("names", ()) if hasattr(dataset, "get") else ()
        for name in [names] if isinstance(names, str) else list(names):
            check_dataset_files(name)


class _InputError(Exception):
    """Bad user input found before training starts: one line on stderr, exit code 2."""


def _local_world_size(world_size: int, num_gpus: int) -> int:
    """Processes per machine under an external launcher: ``LOCAL_WORLD_SIZE`` (torchrun sets
    it), else ``--num-gpus`` (detectron2's meaning: processes per machine); ``LOCAL_RANK`` must
    be below it."""
    value, local_rank = os.environ.get("LOCAL_WORLD_SIZE"), int(os.environ["LOCAL_RANK"])
    local = int(value) if value else num_gpus
    problem = (f"WORLD_SIZE={world_size} is not a multiple of" if local < 1 or world_size % local
               else f"LOCAL_RANK={local_rank} is not below" if not 0 <= local_rank < local
               else "")
    if problem:  # a rank past the local world would wrap DDP on another rank's GPU
        raise _InputError(
            f"{problem} the processes per machine ({local}, from "
            + ("LOCAL_WORLD_SIZE" if value else "--num-gpus, as LOCAL_WORLD_SIZE is not set")
            + "): set LOCAL_WORLD_SIZE, or pass --num-gpus with the processes each machine runs"
        )
    return local


def _torchrun_worker(main_func, args) -> None:
    """Join a process group as torchrun's env:// variables say, as detectron2's launch sets up
    a worker: NCCL for a CUDA config, gloo for a CPU one, detectron2's 30-minute timeout (rank
    0 alone runs COCO evaluation; NCCL's default of 10 minutes can expire there)."""
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world_size = _processes_per_machine(args)
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", init_method="env://",
                            timeout=DEFAULT_TIMEOUT)
    comm.create_local_process_group(local_world_size)
    comm.synchronize()
    main_func(args)


@contextlib.contextmanager
def _cuda_hidden():
    """``CUDA_VISIBLE_DEVICES`` empty for the processes started inside (restored after)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def launch(main_func, num_processes: int, *, device: str, num_machines: int = 1,
           machine_rank: int = 0, dist_url=None, args=(), timeout=DEFAULT_TIMEOUT):
    """detectron2's ``launch`` (``num_processes`` per machine), the backend chosen by
    ``device``: detectron2 picks NCCL whenever the host has a GPU, so the processes of a CPU
    run start with no GPU visible (gloo, and nothing of theirs lands on a GPU)."""
    hide = torch.device(device).type == "cpu" and num_processes * num_machines > 1
    with _cuda_hidden() if hide else contextlib.nullcontext():
        return detectron2_launch(main_func, num_processes, num_machines=num_machines,
                                 machine_rank=machine_rank, dist_url=dist_url, args=args,
                                 timeout=timeout)


def _check_weights(weights: str, key: str, build_model, output_dir: str, resume: bool) -> None:
    """Load the file training would start from (``weights``, or with ``resume`` the last
    checkpoint in ``output_dir``) into ``build_model()``, a CPU copy of the model, before any
    process starts: a file that is missing, unreadable, of an unsupported format, that does not
    fit (:func:`~gn_det.checkpoint.weights.fit_summary`) or holds impossible values is refused
    here; a URL is fetched into detectron2's download cache once, not by each process."""
    from ..checkpoint.io import CheckpointError
    from ..checkpoint.remote import is_url

    last = Checkpointer(None, save_dir=output_dir)
    if resume and last.has_checkpoint():
        weights, key = last.get_checkpoint_file(), "--resume"
    if not weights:
        return
    if not is_url(weights) and not os.path.isfile(weights):
        raise _InputError(f"{key}: no such file {weights!r}")
    gn_det_logger = logging.getLogger("gn_det")
    level = gn_det_logger.level
    gn_det_logger.setLevel(logging.ERROR)  # what loading says, each process says in its log
    try:
        Checkpointer(build_model()).load_weights(weights)
    except CheckpointError as e:
        raise _InputError(f"{key}: {e}") from e
    finally:
        gn_det_logger.setLevel(level)


def check_device(device: str, key: str = "MODEL.DEVICE", processes: int = 1) -> None:
    """Raise :class:`ConfigError` (one line: what to check, how to train on the CPU on
    purpose) when the config asks for a GPU this host cannot give, before any process starts."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ConfigError(f"{key} = {device!r}: {e}") from e
    if kind != "cuda":
        return
    if not torch.cuda.is_available():
        build = (f"this torch is built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else "this torch is a CPU-only build")
        raise ConfigError(
            f"{key} is {device!r}, but no CUDA GPU is usable here ({build}): check that the GPUs "
            "are visible (docker run --gpus all, CUDA_VISIBLE_DEVICES, nvidia-smi) and that the "
            f"NVIDIA driver supports that CUDA; to run on the CPU on purpose, add {key} cpu"
        )
    if processes > torch.cuda.device_count():
        raise ConfigError(
            f"--num-gpus {processes}, but this machine shows {torch.cuda.device_count()} CUDA "
            "GPU(s): start at most one process per GPU"
        )


def _check_yaml_config(args: argparse.Namespace) -> None:
    from detectron2.modeling import build_model

    from ..data import check_dataset_files
    from ..modeling.meta_arch import routed_copy

    cfg = load_config(args.config_file, allow_unsafe_yaml=args.allow_unsafe_yaml)
    merge_overrides(cfg, args.opts)
    datasets = [] if args.eval_only else list(cfg.DATASETS.TRAIN)
    for name in datasets + list(cfg.DATASETS.TEST):
        check_dataset_files(name)
    args.device = cfg.MODEL.DEVICE
    check_device(args.device, "MODEL.DEVICE", _processes_per_machine(args))
    cfg.MODEL.DEVICE = "cpu"
    cpu_model = functools.cache(lambda: build_model(routed_copy(cfg)))  # built once, if at all
    if cfg.MODEL.NORM_CONVERSION.FOLDED:  # a fold plan the model cannot take: refused as built
        cpu_model()
    _check_weights(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", cpu_model, cfg.OUTPUT_DIR, args.resume)


def _check_lazy_config(args: argparse.Namespace) -> None:
    from detectron2.config import LazyConfig, instantiate

    from omegaconf import OmegaConf

    try:
        cfg = LazyConfig.load(args.config_file)
    except (KeyError, ValueError, AttributeError, ImportError, SyntaxError) as e:
        raise ConfigError(f"{args.config_file}: {type(e).__name__}: {e}") from e
    missing = object()
    for override in args.opts:
        key, equals, _ = override.partition("=")
        if not equals:
            raise ConfigError(f"{args.config_file}: LazyConfig overrides are KEY=VALUE, "
                              f"got {override!r}")
        if OmegaConf.select(cfg, key, default=missing) is missing:
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            known = (f"; {parent or 'the config'} has: {', '.join(sorted(node))}"
                     if hasattr(node, "keys") else "")
            raise ConfigError(f"{args.config_file}: unknown config key {key}{known}")
    try:
        cfg = LazyConfig.apply_overrides(cfg, args.opts)
    except (KeyError, ValueError, AttributeError) as e:
        raise ConfigError(f"{args.config_file}: {type(e).__name__}: {e}") from e
    _check_lazy_datasets(cfg)
    args.device = cfg.train.get("device", "cuda")
    check_device(args.device, "train.device", _processes_per_machine(args))
    _check_weights(cfg.train.get("init_checkpoint", "") or "", "train.init_checkpoint",
                   lambda: instantiate(cfg.model), cfg.train.get("output_dir", ""), args.resume)


def _processes_per_machine(args: argparse.Namespace) -> int:
    """Processes this machine runs: ``--num-gpus``, or under an external launcher
    :func:`_local_world_size`."""
    if _under_external_launcher():
        return _local_world_size(int(os.environ["WORLD_SIZE"]), args.num_gpus)
    return args.num_gpus


def _under_external_launcher() -> bool:
    """Started by torchrun (or a launcher setting its variables): the processes exist."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve ``--config`` and check the config, its overrides, its datasets' files and
    ``MODEL.WEIGHTS`` — before any process starts."""
    if args.config and args.config_file:
        raise _InputError("give --config or --config-file, not both")
    if not (args.config or args.config_file):
        raise _InputError("give a config: --config NAME (see gn_det's configs) "
                          "or --config-file PATH")
    args.config_file = str(resolve_config_name(args.config or args.config_file))
    if args.config_file.endswith(".py"):
        _check_lazy_config(args)
    else:
        _check_yaml_config(args)
    return args


#: What bad input raises before training: reported in one line (``--debug``: the traceback).
_INPUT_ERRORS = (_InputError, ConfigError, UnsafeConfigError, FileNotFoundError, KeyError)


def launch_from_args(argv=None, main_func=main, prog: str | None = None):
    """Parse ``argv``, check every input (one line and exit code 2 on a bad one; ``--debug``
    raises), then run ``main_func`` in the processes of :func:`launch`, or, under torchrun
    (``LOCAL_RANK`` and ``WORLD_SIZE`` set), in this one, joined through its rendezvous."""
    parser = argument_parser(prog)
    args = parser.parse_args(argv)
    try:
        args = _resolve_args(args)
    except _INPUT_ERRORS as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.config_file.endswith(".py") and main_func is main:
        main_func = lazy_main  # LazyConfig
    if _under_external_launcher():
        return _torchrun_worker(main_func, args)
    return launch(main_func, args.num_gpus, device=args.device, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))


