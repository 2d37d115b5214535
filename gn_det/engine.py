"""Training the detectron2 way: a ``DefaultTrainer`` subclass that differs where gn_det's
runs need it: AMP unscales before clipping (bfloat16 on CPUs), AdamW, resuming from any of
these trainers, DDP on CPUs, a norm audit. ``gn-det train`` drives it (:mod:`gn_det.cli.train`).
"""

from __future__ import annotations

import logging
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from . import _deprecated
from .checkpoint import Checkpointer
from .config import OPTIMIZERS, add_trainer_config, check_trainer_config
from .report import audit_norms

__all__ = [
    "CPUAutocastTrainer",
    "CUDAAMPTrainer",
    "OPTIMIZERS",
    "TrainLoop",
    "Trainer",
    "add_trainer_config",
    "build_optimizer",
    "check_trainer_config",
    "cpu_bfloat16_supported",
    "create_ddp_model",
    "load_optimizer_state",
    "training_loop_class",
]

logger = logging.getLogger(__name__)


def create_ddp_model(
    model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs
) -> torch.nn.Module:
    """``DistributedDataParallel`` over the processes (none for one), as detectron2's
    ``create_ddp_model`` does, but without ``device_ids`` for a CPU model, which DDP refuses."""
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
    checks = [getattr(cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


#: Optimizer options that choose an implementation (kernel, graph capture), not the mathematics:
#: a resumed optimizer keeps today's, whatever the checkpoint's run used.
_IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping ``optimizer``'s own implementation flags
    (``fused``, ``foreach``, ...): torch takes them from the checkpoint, and would place the
    state for that run's implementation (a fused CUDA AdamW needs its ``step`` on the GPU)."""
    saved_groups = state.get("param_groups", [])
    if len(saved_groups) == len(optimizer.param_groups):  # else torch's own error says so
        groups = [{**saved, **{k: current[k] for k in _IMPLEMENTATION_FLAGS if k in current}}
                  for saved, current in zip(saved_groups, optimizer.param_groups)]
        state = {**state, "param_groups": groups}
    optimizer.load_state_dict(state)


class _ResumesAnyTrainersState:
    """Loads a training state saved by any of gn_det's trainers (mixin for detectron2's):
    iteration and hooks as detectron2 does, the optimizer with its own implementation flags
    (:func:`load_optimizer_state`)."""

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        load_optimizer_state(self.optimizer, state_dict["optimizer"])


class TrainLoop(_ResumesAnyTrainersState, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` (float32), resuming from the state of any of gn_det's
    trainers (a run begun with AMP on a GPU, or with bfloat16 autocast on a CPU)."""


class CPUAutocastTrainer(TrainLoop):
    """``SimpleTrainer`` whose forward pass runs under CPU autocast in bfloat16 (detectron2's
    ``AMPTrainer`` is CUDA-only). bfloat16 has float32's range: no loss scaling; weights,
    gradients and the optimizer stay float32; evaluation is not affected."""

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


class CUDAAMPTrainer(_ResumesAnyTrainersState, AMPTrainer):
    """detectron2's ``AMPTrainer`` (float16 autocast, a gradient scaler) that unscales the
    gradients right after backward, as PyTorch's AMP recipe requires before clipping (with a
    fused AdamW, ``GradScaler.step`` does not, and ``SOLVER.CLIP_GRADIENTS`` would clip scaled
    gradients), and resumes a run saved without a scaler (another trainer) with a fresh one."""

    def __init__(self, model, data_loader, optimizer, **kwargs):
        if kwargs.get("grad_scaler") is None:
            kwargs["grad_scaler"] = torch.amp.GradScaler("cuda")
        super().__init__(model, data_loader, optimizer, **kwargs)

    def after_backward(self):
        self.grad_scaler.unscale_(self.optimizer)
        super().after_backward()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        else:
            logger.info("Resuming a run saved without AMP's gradient scaler (another trainer): "
                        "starting with a fresh scaler (scale %g).", self.grad_scaler.get_scale())


def training_loop_class(amp: bool, device: str) -> type:
    """TrainLoop, or with ``amp`` (``SOLVER.AMP.ENABLED``, a LazyConfig's
    ``train.amp.enabled``): CUDAAMPTrainer on CUDA, bfloat16 autocast on CPU (float32 with a
    warning where the CPU lacks native bfloat16). detectron2's AMPTrainer fails on CPU."""
    if not amp:
        return TrainLoop
    if torch.device(device).type == "cuda":
        return CUDAAMPTrainer
    if cpu_bfloat16_supported():
        return CPUAutocastTrainer
    logger.warning("SOLVER.AMP.ENABLED: this CPU has no native bfloat16 (AVX512-BF16 or AMX); "
                   "training in float32.")
    return TrainLoop


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's ``build_optimizer`` (SGD), or AdamW when ``SOLVER.OPTIMIZER`` says so: the
    same parameter groups (``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS``)
    and gradient clipping (``SOLVER.CLIP_GRADIENTS``)."""
    from detectron2.solver import build_optimizer as build_sgd
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

    if cfg.SOLVER.get("OPTIMIZER", "SGD") == "SGD":
        return build_sgd(cfg, model)
    solver = cfg.SOLVER
    params = get_default_optimizer_params(model, base_lr=solver.BASE_LR,
                                          weight_decay_norm=solver.WEIGHT_DECAY_NORM,
                                          bias_lr_factor=solver.BIAS_LR_FACTOR,
                                          weight_decay_bias=solver.WEIGHT_DECAY_BIAS)
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
    """``DefaultTrainer`` with gn_det's training loops and optimizer, its checkpointer (safe
    loading of every format, atomic saves), COCO evaluation and a norm audit.

    ``__init__`` builds what ``DefaultTrainer.__init__`` builds, through the same overridable
    class methods, for one reason: detectron2 wraps the model in DDP with ``device_ids`` set,
    which DDP refuses for a model on the CPU, and offers no hook to do otherwise.
    """

    def __init__(self, cfg: CfgNode):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # as DefaultTrainer does, for a caller that set up no logging
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        loop = training_loop_class(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE)
        self._trainer = loop(model, data_loader, optimizer)
        logger.info("Training loop: %s; optimizer: %s", loop.__name__, type(optimizer).__name__)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter, self.max_iter, self.cfg = 0, cfg.SOLVER.MAX_ITER, cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        from .modeling.meta_arch import routed_copy

        model = super().build_model(routed_copy(cfg))
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
        import os

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


#: Names that moved to :mod:`gn_det.cli.train` (the ``gn-det train`` command).
__getattr__ = _deprecated.forward_moved_names(
    __name__, "gn_det.cli.train",
    ("argument_parser", "check_device", "launch", "launch_from_args", "lazy_main", "main", "setup"))
