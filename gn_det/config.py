"""gn_det's config keys: ``add_gn_det_config(cfg)`` adds ``MODEL.NORM_CONVERSION``.

detectron2's ``build_model`` honours the keys through a registered meta-architecture,
``NormConverted`` (:mod:`gn_det.modeling.meta_arch`): it builds the architecture named by
``MODEL.NORM_CONVERSION.META_ARCHITECTURE`` and converts it. :func:`route_meta_architecture`
points a config at it; gn_det's commands and :func:`gn_det.build_model` do so themselves.
"""

from __future__ import annotations

from typing import Optional

from detectron2.config import CfgNode
from detectron2.config import get_cfg as _d2_get_cfg
from torch import nn

from . import _deprecated
from .convert import NormSpec, convert_norm_by_spec
from .groups import check_group_args
from .recompute import enable_recompute
from .standardization import standardize_weights
from .registry import NORM_TARGETS
from .transfer import check_transfer

__all__ = [
    "CONVERTING_META_ARCHITECTURE",
    "ConfigError",
    "OPTIMIZERS",
    "add_gn_det_config",
    "add_torchvision_backbone_config",
    "add_trainer_config",
    "check_trainer_config",
    "check_config",
    "convert_model_by_config",
    "get_cfg",
    "norm_spec_from_config",
    "route_meta_architecture",
]

#: The registered meta-architecture that builds ``MODEL.NORM_CONVERSION.META_ARCHITECTURE``
#: and converts it (:mod:`gn_det.modeling.meta_arch`).
CONVERTING_META_ARCHITECTURE = "NormConverted"


def add_gn_det_config(cfg: CfgNode) -> CfgNode:
    """Add gn_det's keys (with their defaults) to a detectron2 config, in place; returns it.

    ``MODEL.NORM_CONVERSION`` (the switch), the trainer's ``SOLVER.OPTIMIZER`` /
    ``SOLVER.BETAS`` and the torchvision-backbone keys.
    """
    _C = cfg
    _C.MODEL.NORM_CONVERSION = CfgNode()
    # Convert the built model's BatchNorm-family layers (BN, SyncBN, FrozenBN, ...) to TARGET.
    _C.MODEL.NORM_CONVERSION.ENABLED = False
    # The architecture MODEL.META_ARCHITECTURE "NormConverted" builds, then converts.
    _C.MODEL.NORM_CONVERSION.META_ARCHITECTURE = "GeneralizedRCNN"
    # "GN", or within the BN family "FrozenBN", "BN", "SyncBN", "naiveSyncBN".
    _C.MODEL.NORM_CONVERSION.TARGET = "GN"
    # GroupNorm groups (Wu & He 2018: 32); widths 32 does not divide use the largest divisor below.
    _C.MODEL.NORM_CONVERSION.NUM_GROUPS = 32
    # Channels per group instead of NUM_GROUPS (the paper's alternative, e.g. 16); 0: off.
    _C.MODEL.NORM_CONVERSION.DIM_PER_GROUP = 0
    # eps of the new layers; 0.0 keeps each source layer's eps.
    _C.MODEL.NORM_CONVERSION.EPS = 0.0
    # BN -> GN weight transfer, here and whenever BN weights are loaded: "stats" or "copy".
    _C.MODEL.NORM_CONVERSION.TRANSFER = "stats"
    # Module-name prefixes to convert, e.g. ["backbone", "roi_heads.mask_head"]; []: all.
    _C.MODEL.NORM_CONVERSION.INCLUDE = []
    # Module-name prefixes to leave alone (wins over INCLUDE).
    _C.MODEL.NORM_CONVERSION.EXCLUDE = []
    # Weight Standardization (Qiao et al. 2019) in every conv whose norm is a GroupNorm after
    # conversion (converted or built as GN; INCLUDE/EXCLUDE apply): the GN + WS target.
    _C.MODEL.NORM_CONVERSION.WEIGHT_STANDARDIZATION = False
    # Recompute conv+GN in backward instead of storing the GN input (less memory, slower step).
    _C.MODEL.NORM_CONVERSION.RECOMPUTE = False
    # Build the inference form gn-det convert --to folded writes: GroupNorm folded into its conv.
    _C.MODEL.NORM_CONVERSION.FOLDED = False
    # Module-name prefixes whose GroupNorm stays GroupNorm in the folded form.
    _C.MODEL.NORM_CONVERSION.FOLDED_EXCLUDE = []
    add_trainer_config(cfg)
    add_torchvision_backbone_config(cfg)
    return cfg


OPTIMIZERS = ("SGD", "AdamW")  # SOLVER.OPTIMIZER


def add_trainer_config(cfg: CfgNode) -> CfgNode:
    """Add the keys of :class:`gn_det.engine.Trainer` (its solver) to ``cfg``, in place.
    ``SOLVER.AMP.ENABLED`` is detectron2's: float16 on CUDA, bfloat16 on CPU here."""
    # Optimizer of Trainer.build_optimizer: "SGD" (detectron2's: MOMENTUM, NESTEROV) or
    # "AdamW" (BETAS); both with BASE_LR, WEIGHT_DECAY(_NORM/_BIAS) and gradient clipping.
    cfg.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2).
    cfg.SOLVER.BETAS = (0.9, 0.999)
    return cfg


def check_trainer_config(cfg: CfgNode) -> None:
    """Raises :class:`ConfigError` for an unknown ``SOLVER.OPTIMIZER``."""
    optimizer = cfg.SOLVER.get("OPTIMIZER", "SGD")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"SOLVER.OPTIMIZER = {optimizer!r}: valid optimizers: "
                          f"{', '.join(OPTIMIZERS)}")


def add_torchvision_backbone_config(cfg: CfgNode) -> CfgNode:
    """Add the keys of :func:`gn_det.modeling.build_torchvision_resnet_fpn_backbone` (with
    defaults) to ``cfg``, in place; returns it."""
    cfg.MODEL.TORCHVISION_RESNET = CfgNode()
    # torchvision's zero_init_residual: each residual block's last BN starts at γ = 0 (scratch).
    cfg.MODEL.TORCHVISION_RESNET.ZERO_INIT_RESIDUAL = False
    return cfg


def get_cfg() -> CfgNode:
    """detectron2's default config with gn_det's keys added."""
    return add_gn_det_config(_d2_get_cfg())


class ConfigError(ValueError):
    """A config gn_det cannot use (unknown key, bad value); the message names the key and what
    is allowed, in one line."""


def _positive_number(value) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"must be a positive number (or 0.0: each source layer's eps), "
                         f"got {value!r}")


#: ``MODEL.NORM_CONVERSION`` key -> check of its value (raises ``ValueError``).
_CONVERSION_CHECKS = {
    "TARGET": NORM_TARGETS.get,
    "TRANSFER": check_transfer,
    "NUM_GROUPS": lambda value: check_group_args(num_groups=value),
    "DIM_PER_GROUP": lambda value: value == 0 or check_group_args(dim_per_group=value),
    "EPS": lambda value: value == 0 or _positive_number(value),
}


def check_config(cfg: CfgNode) -> None:
    """Check the values of gn_det's keys (whether or not conversion is enabled).

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.
    """
    check_trainer_config(cfg)
    node = cfg.MODEL.get("NORM_CONVERSION")
    if node is None:
        return
    for key, check in _CONVERSION_CHECKS.items():
        try:
            check(node[key])
        except ValueError as e:
            raise ConfigError(f"MODEL.NORM_CONVERSION.{key} = {node[key]!r}: {e}") from e
    inner = node.get("META_ARCHITECTURE", "")
    if inner == CONVERTING_META_ARCHITECTURE:
        raise ConfigError(f"MODEL.NORM_CONVERSION.META_ARCHITECTURE = {inner!r}: name the "
                          "architecture to build and convert, e.g. GeneralizedRCNN")


#: ``MODEL.NORM_CONVERSION`` keys that change the built model, each on its own.
_MODEL_KEYS = ("ENABLED", "WEIGHT_STANDARDIZATION", "FOLDED", "RECOMPUTE")


def _asks_for_conversion(cfg: CfgNode) -> bool:
    node = cfg.MODEL.get("NORM_CONVERSION")
    return node is not None and any(node.get(k, False) for k in _MODEL_KEYS)


def route_meta_architecture(cfg: CfgNode) -> CfgNode:
    """Point ``cfg`` at the ``NormConverted`` meta-architecture when ``MODEL.NORM_CONVERSION``
    asks for anything (``ENABLED``, ``WEIGHT_STANDARDIZATION``, ``FOLDED``, ``RECOMPUTE``), in
    place; returns ``cfg``.

    ``MODEL.META_ARCHITECTURE`` moves to ``MODEL.NORM_CONVERSION.META_ARCHITECTURE``, so
    detectron2's own ``build_model`` (and ``DefaultPredictor``) builds it and converts it.
    Nothing changes when conversion is not asked for or the config is routed already.
    """
    if _asks_for_conversion(cfg) and cfg.MODEL.META_ARCHITECTURE != CONVERTING_META_ARCHITECTURE:
        cfg.MODEL.NORM_CONVERSION.META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE
        cfg.MODEL.META_ARCHITECTURE = CONVERTING_META_ARCHITECTURE
    return cfg


def norm_spec_from_config(cfg: CfgNode) -> Optional[NormSpec]:
    """The :class:`NormSpec` that ``cfg.MODEL.NORM_CONVERSION`` asks for; ``None`` if disabled.

    Raises:
        ConfigError: a bad value, naming its key (:func:`check_config`).
    """
    node = cfg.MODEL.get("NORM_CONVERSION")
    if node is None or not node.ENABLED:
        return None
    check_config(cfg)
    try:  # what only the keys together decide (WEIGHT_STANDARDIZATION needs TARGET GN)
        return NormSpec(target=node.TARGET, num_groups=node.NUM_GROUPS,
                        dim_per_group=node.DIM_PER_GROUP or None, eps=node.EPS or None,
                        transfer=node.TRANSFER, include=tuple(node.INCLUDE),
                        exclude=tuple(node.EXCLUDE),
                        weight_standardization=node.get("WEIGHT_STANDARDIZATION", False))
    except ValueError as e:
        raise ConfigError(f"MODEL.NORM_CONVERSION: {e}") from e


def convert_model_by_config(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """
    Convert ``model`` as ``cfg.MODEL.NORM_CONVERSION`` says (unchanged when disabled).

    ``WEIGHT_STANDARDIZATION`` standardises the weights of the convs before GroupNorm layers,
    those the model was built with included (:func:`gn_det.standardize_weights`).
    ``FOLDED`` then gives the model the structure of ``gn-det convert --to folded``'s output
    (:func:`gn_det.folding.folded_architecture`, GroupNorm layers under ``FOLDED_EXCLUDE``
    kept; a :class:`ConfigError` if the model has no GroupNorm), and ``RECOMPUTE`` applies
    :func:`gn_det.enable_recompute` to the GroupNorm layers left — also those the model was
    built with (detectron2's native GN configs), whether or not ``ENABLED`` is set.
    """
    spec = norm_spec_from_config(cfg)
    if spec is not None:
        model = convert_norm_by_spec(model, spec)
    node = cfg.MODEL.get("NORM_CONVERSION")
    if spec is None and node is not None and node.get("WEIGHT_STANDARDIZATION", False):
        check_config(cfg)
        standardize_weights(model, include=tuple(node.INCLUDE), exclude=tuple(node.EXCLUDE))
    if node is not None and node.get("FOLDED", False):
        from .folding import folded_architecture

        if not any(isinstance(m, nn.GroupNorm) for m in model.modules()):
            raise ConfigError("MODEL.NORM_CONVERSION.FOLDED True folds GroupNorm layers, but this "
                              "model has none: set MODEL.NORM_CONVERSION.ENABLED True (TARGET GN) "
                              "to convert its norms first")
        folded_architecture(model, exclude=tuple(node.get("FOLDED_EXCLUDE", ())))
    if node is not None and node.get("RECOMPUTE", False):
        enable_recompute(model)
    return model


#: Names that moved to :mod:`gn_det.cli.config_files` (the command line's config handling).
__getattr__ = _deprecated.forward_moved_names(
    __name__, "gn_det.cli.config_files",
    ("CONFIGS_DIR", "UnsafeConfigError", "load_config", "merge_overrides", "resolve_config_name"))
