"""Training and evaluation, the detectron2 way: ``DefaultTrainer`` plus what gn_det needs.

``gn-det train`` and ``tools/train_net.py`` are thin shells over :func:`launch_from_args`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import weakref

import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import Checkpointer
from .config import ConfigError, UnsafeConfigError, load_config, merge_overrides, resolve_config_name
from .report import audit_norms

__all__ = [
    "CPUAutocastTrainer",
    "Trainer",
    "argument_parser",
    "build_optimizer",
    "cpu_bfloat16_supported",
    "launch_from_args",
    "lazy_main",
    "main",
    "setup",
]

logger = logging.getLogger(__name__)


def create_ddp_model(
    model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs
) -> torch.nn.Module:
    """detectron2's ``create_ddp_model``, also on CPU (gloo), where DDP takes no device_ids."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def cpu_bfloat16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): where it does not,
    bfloat16 autocast is emulated and slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass runs under CPU autocast in bfloat16.

    detectron2's ``AMPTrainer`` is CUDA-only (float16 with a gradient scaler). bfloat16 has
    float32's exponent range, so no loss scaling is needed. Under autocast's CPU policy
    convolutions and linear layers compute in bfloat16; GroupNorm takes and returns their
    bfloat16 (its CPU kernel accumulates the statistics in float32); the losses (cross-entropy,
    BCE, smooth L1) are float32; weights, gradients and the optimizer stay float32. Evaluation
    is not affected.
    """

    def run_step(self):
        model = self.model
        own = model.__dict__.get("forward")
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
        try:
            super().run_step()
        finally:
            if own is None:
                del model.forward  # the class's forward again
            else:
                model.forward = own


def _trainer_class(amp: bool, device: str):
    """SimpleTrainer, or with ``amp`` (``SOLVER.AMP.ENABLED``, a LazyConfig's
    ``train.amp.enabled``): AMPTrainer on CUDA, bfloat16 autocast on CPU (float32 with a
    warning where the CPU lacks native bfloat16). detectron2's AMPTrainer fails on CPU."""
    if not amp:
        return SimpleTrainer
    if str(device) != "cpu":
        return AMPTrainer
    if cpu_bfloat16_supported():
        return CPUAutocastTrainer
    logger.warning("SOLVER.AMP.ENABLED: this CPU has no native bfloat16 (AVX512-BF16 or AMX); "
                   "training in float32.")
    return SimpleTrainer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's ``build_optimizer`` (SGD), or AdamW when ``SOLVER.OPTIMIZER`` says so: the
    same parameter groups (``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS``)
    and gradient clipping (``SOLVER.CLIP_GRADIENTS``)."""
    from detectron2.solver import build_optimizer as build_sgd
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

    if cfg.SOLVER.get("OPTIMIZER", "SGD") == "SGD":
        return build_sgd(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    kwargs = dict(lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS),
                  weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    try:
        # One fused kernel per step: 8 ms instead of 32 (foreach) or 57 (a loop over tensors)
        # for the shapes model on 2 CPU cores. torch < 2.4 has no fused CPU AdamW.
        adamw = torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:
        adamw = torch.optim.AdamW(params, foreach=True, **kwargs)
    return maybe_add_gradient_clipping(cfg, adamw)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with COCO evaluation, a norm audit, and DDP that also runs on CPU."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__, except for the DDP wrapper (detectron2's passes device_ids,
        # which CPU DDP refuses).
        super(DefaultTrainer, self).__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = _trainer_class(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE)(model, data_loader, optimizer)
        logger.info("Training loop: %s; optimizer: %s", type(self._trainer).__name__,
                    type(optimizer).__name__)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = super().build_model(cfg)  # detectron2's build_model converts (gn_det.config)
        world_size = comm.get_world_size()
        audit_norms(model, max(cfg.SOLVER.IMS_PER_BATCH // world_size, 1), world_size)
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        from .data import check_dataset_files

        for name in cfg.DATASETS.TRAIN:
            check_dataset_files(name)
        return super().build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        from .data import check_dataset_files

        check_dataset_files(dataset_name)
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def argument_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """detectron2's training flags plus ``--config NAME``, ``--allow-unsafe-yaml``, ``--debug``."""
    parser = default_argument_parser(
        epilog="Example: gn-det train --config gn_mask_rcnn.yaml --num-gpus 8"
    )
    if prog:
        parser.prog = prog
    parser.add_argument(
        "--config",
        metavar="NAME",
        default="",
        help="a config by name, looked up in gn_det's configs from any directory "
        "(gn_mask_rcnn.yaml, shapes/gn.yaml); or a path. Alternative to --config-file.",
    )
    parser.add_argument(
        "--allow-unsafe-yaml",
        action="store_true",
        help="accept configs that need yaml.unsafe_load (they can run code when loaded)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a bad config or input"
    )
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from ``args`` (file, overrides), frozen; detectron2's default_setup (logs, output)."""
    cfg = load_config(args.config_file, allow_unsafe_yaml=args.allow_unsafe_yaml)
    merge_overrides(cfg, args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gn_det")
    return cfg


def main(args: argparse.Namespace):
    """Train (or evaluate with ``--eval-only``) in this process; returns the eval results."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _lazy_test(cfg, model):
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def lazy_main(args: argparse.Namespace):
    """Train or evaluate a LazyConfig (``.py``) config: detectron2's
    ``tools/lazyconfig_train_net.py``, with gn_det's norm audit, safe weight loading and DDP
    that also runs on CPU."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import hooks
    from detectron2.engine.defaults import default_writers

    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if not torch.cuda.is_available():
        cfg.train.device = "cpu"
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
    trainer = _trainer_class(cfg.train.amp.enabled, cfg.train.device)(model, train_loader, optimizer)
    checkpointer = Checkpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: _lazy_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def _check_lazy_datasets(cfg) -> None:
    """Missing COCO files: a clear error before training (as for YAML configs)."""
    from .data import check_dataset_files

    for split in ("train", "test"):
        dataset = cfg.dataloader.get(split, {}).get("dataset", {})
        names = dataset.get("names", ()) if hasattr(dataset, "get") else ()
        for name in [names] if isinstance(names, str) else list(names):
            check_dataset_files(name)


def _torchrun_worker(main_func, args) -> None:
    """Run under torchrun / torch.distributed.run (its env:// variables), as detectron2's
    launch would set up each worker."""
    local_rank = int(os.environ["LOCAL_RANK"])
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="NCCL" if has_gpu else "GLOO", init_method="env://")
    comm.create_local_process_group(int(os.environ["LOCAL_WORLD_SIZE"]))
    comm.synchronize()
    main_func(args)


class _InputError(Exception):
    """Bad user input found before training starts: one line on stderr, exit code 2."""


def _check_weights(weights: str) -> None:
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise _InputError(f"MODEL.WEIGHTS: no such file {weights!r}")


def _check_yaml_config(args: argparse.Namespace) -> None:
    from .data import check_dataset_files

    cfg = load_config(args.config_file, allow_unsafe_yaml=args.allow_unsafe_yaml)
    merge_overrides(cfg, args.opts)
    datasets = [] if args.eval_only else list(cfg.DATASETS.TRAIN)
    for name in datasets + list(cfg.DATASETS.TEST):
        check_dataset_files(name)
    if not args.resume or args.eval_only:
        _check_weights(cfg.MODEL.WEIGHTS)


def _check_lazy_config(args: argparse.Namespace) -> None:
    from detectron2.config import LazyConfig

    from omegaconf import OmegaConf

    try:
        cfg = LazyConfig.load(args.config_file)
    except (KeyError, ValueError, AttributeError, ImportError, SyntaxError) as e:
        raise ConfigError(f"{args.config_file}: {type(e).__name__}: {e}") from e
    missing = object()
    for override in args.opts:
        key, equals, _ = override.partition("=")
        if not equals:
            raise ConfigError(f"{args.config_file}: LazyConfig overrides are KEY=VALUE, got {override!r}")
        if OmegaConf.select(cfg, key, default=missing) is missing:
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            known = f"; {parent or 'the config'} has: {', '.join(sorted(node))}" if hasattr(node, "keys") else ""
            raise ConfigError(f"{args.config_file}: unknown config key {key}{known}")
    try:
        cfg = LazyConfig.apply_overrides(cfg, args.opts)
    except (KeyError, ValueError, AttributeError) as e:
        raise ConfigError(f"{args.config_file}: {type(e).__name__}: {e}") from e
    _check_lazy_datasets(cfg)
    if not args.resume or args.eval_only:
        _check_weights(cfg.train.get("init_checkpoint", ""))


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve ``--config`` and check the config, its overrides, its datasets' files and
    ``MODEL.WEIGHTS`` — before any process starts or any model is built."""
    if args.config and args.config_file:
        raise _InputError("give --config or --config-file, not both")
    if not (args.config or args.config_file):
        raise _InputError("give a config: --config NAME (see gn_det's configs) or --config-file PATH")
    args.config_file = str(resolve_config_name(args.config or args.config_file))
    if args.config_file.endswith(".py"):
        _check_lazy_config(args)
    else:
        _check_yaml_config(args)
    return args


#: What bad input raises before training: reported in one line (``--debug``: the traceback).
_INPUT_ERRORS = (_InputError, ConfigError, UnsafeConfigError, FileNotFoundError, KeyError)


def launch_from_args(argv=None, main_func=main, prog: str | None = None):
    """Parse ``argv``, check the config, then run ``main_func`` on 1 or more processes / machines.

    A bad config (unknown key, bad value, unknown config name, missing dataset files or weights)
    is one line on stderr and exit code 2, before any model is built; ``--debug`` raises instead.

    Multi-process and multi-node runs use detectron2's ``launch`` (``--num-gpus``,
    ``--num-machines``, ``--machine-rank``, ``--dist-url``; NCCL on GPUs, gloo on CPU, where
    ``--num-gpus`` counts CPU processes). Under torchrun (``LOCAL_RANK`` set) the processes
    already exist and join through torchrun's rendezvous instead.
    """
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
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _torchrun_worker(main_func, args)
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(launch_from_args())
