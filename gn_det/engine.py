"""Training and evaluation, the detectron2 way: ``DefaultTrainer`` plus what gn_det needs.

``tools/train_net.py`` is a thin shell over :func:`main` and :func:`launch_from_args`.
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
from .config import UnsafeConfigError, load_config, resolve_config_name
from .report import audit_norms

__all__ = ["Trainer", "argument_parser", "setup", "main", "lazy_main", "launch_from_args"]

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
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
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


def argument_parser() -> argparse.ArgumentParser:
    """detectron2's training flags plus ``--config NAME`` and ``--allow-unsafe-yaml``."""
    parser = default_argument_parser(
        epilog="Example: tools/train_net.py --config gn_mask_rcnn.yaml --num-gpus 8"
    )
    parser.add_argument(
        "--config",
        metavar="NAME",
        default="",
        help="a config by name, looked up in gn_det's configs/ from any directory "
        "(gn_mask_rcnn.yaml, shapes/gn.yaml); or a path. Alternative to --config-file.",
    )
    parser.add_argument(
        "--allow-unsafe-yaml",
        action="store_true",
        help="accept configs that need yaml.unsafe_load (they can run code when loaded)",
    )
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from ``args`` (file, overrides), frozen; detectron2's default_setup (logs, output)."""
    cfg = load_config(args.config_file, allow_unsafe_yaml=args.allow_unsafe_yaml)
    cfg.merge_from_list(args.opts)
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
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
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


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.config and args.config_file:
        raise SystemExit("error: give --config or --config-file, not both")
    try:
        args.config_file = str(resolve_config_name(args.config or args.config_file))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if not args.allow_unsafe_yaml and not args.config_file.endswith(".py"):
        try:
            load_config(args.config_file)  # refuse before any process is started
        except UnsafeConfigError as e:
            raise SystemExit(f"error: {e}") from None
    return args


def launch_from_args(argv=None, main_func=main):
    """Parse ``argv``, then run ``main_func`` on 1 or more processes / machines.

    Multi-process and multi-node runs use detectron2's ``launch`` (``--num-gpus``,
    ``--num-machines``, ``--machine-rank``, ``--dist-url``; NCCL on GPUs, gloo on CPU, where
    ``--num-gpus`` counts CPU processes). Under torchrun (``LOCAL_RANK`` set) the processes
    already exist and join through torchrun's rendezvous instead.
    """
    args = _resolve_args(argument_parser().parse_args(argv))
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
