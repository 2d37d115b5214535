"""gn_det's config keys, and the hook that makes detectron2's ``build_model`` honour them.

``add_gn_det_config(cfg)`` adds ``MODEL.NORM_CONVERSION``. After ``import gn_det``, detectron2's
stock ``detectron2.modeling.build_model(cfg)`` converts the model it builds whenever
``cfg.MODEL.NORM_CONVERSION.ENABLED`` is true — for any meta-architecture, backbone or head the
config names, those a user registers included.

How: ``build_model`` builds ``META_ARCH_REGISTRY.get(name)(cfg)``. detectron2 offers no
post-build hook, so gn_det gives ``META_ARCH_REGISTRY`` a lookup table whose ``get`` returns the
registered class wrapped in a builder that converts after construction. Registration,
iteration and ``in`` are unchanged, no detectron2 function or file is replaced, and with
``ENABLED: False`` (the default) the built model is exactly detectron2's.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import yaml
from detectron2.config import CfgNode
from detectron2.config import get_cfg as _d2_get_cfg
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .convert import NormSpec, convert_norm_by_spec
from .groups import check_group_args
from .recompute import enable_recompute
from .registry import NORM_TARGETS
from .transfer import check_transfer

__all__ = [
    "ConfigError",
    "add_gn_det_config",
    "check_config",
    "get_cfg",
    "merge_overrides",
    "norm_spec_from_config",
    "convert_model_by_config",
    "load_config",
    "resolve_config_name",
    "UnsafeConfigError",
    "CONFIGS_DIR",
]

logger = logging.getLogger(__name__)


def _configs_dir() -> Path:
    """gn_det's configs: ``$GN_DET_CONFIGS`` if set; else the package's own ``configs/`` (an
    installed wheel carries the repository's ``configs/`` there as package data); else the
    checkout's top-level ``configs/`` (an editable install or a source tree on ``sys.path``)."""
    override = os.environ.get("GN_DET_CONFIGS")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


#: The folder config names are resolved in (see :func:`_configs_dir`).
CONFIGS_DIR = _configs_dir()


def add_gn_det_config(cfg: CfgNode) -> CfgNode:
    """Add gn_det's keys (with their defaults) to a detectron2 config, in place; returns it.

    ``MODEL.NORM_CONVERSION`` (the switch), ``SOLVER.OPTIMIZER`` / ``SOLVER.BETAS`` (AdamW as
    an alternative to SGD) and the torchvision-backbone keys. ``SOLVER.AMP.ENABLED`` is
    detectron2's: on CUDA its AMPTrainer (float16), on CPU gn_det's bfloat16 autocast.
    """
    from .modeling.torchvision_backbone import add_torchvision_backbone_config

    _C = cfg
    _C.MODEL.NORM_CONVERSION = CfgNode()
    # Convert the built model's BatchNorm-family layers (BN, SyncBN, FrozenBN, ...) to TARGET.
    _C.MODEL.NORM_CONVERSION.ENABLED = False
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
    # Recompute conv+GN in backward instead of storing the GN input (less memory, slower step).
    _C.MODEL.NORM_CONVERSION.RECOMPUTE = False
    # Build the inference form gn-det convert --to folded writes: GroupNorm folded into its conv.
    _C.MODEL.NORM_CONVERSION.FOLDED = False
    # Module-name prefixes whose GroupNorm stays GroupNorm in the folded form.
    _C.MODEL.NORM_CONVERSION.FOLDED_EXCLUDE = []
    # Optimizer of DefaultTrainer.build_optimizer: "SGD" (detectron2's: MOMENTUM, NESTEROV) or
    # "AdamW" (BETAS); both with BASE_LR, WEIGHT_DECAY(_NORM/_BIAS) and gradient clipping.
    _C.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2).
    _C.SOLVER.BETAS = (0.9, 0.999)
    add_torchvision_backbone_config(cfg)
    return cfg


def get_cfg() -> CfgNode:
    """detectron2's default config with gn_det's keys added."""
    return add_gn_det_config(_d2_get_cfg())


class ConfigError(ValueError):
    """A config gn_det cannot use (unknown key, bad value); the message names the key and what
    is allowed, in one line."""


def _positive_number(value) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"must be a positive number (or 0.0: each source layer's eps), got {value!r}")


#: ``MODEL.NORM_CONVERSION`` key -> check of its value (raises ``ValueError``).
_CONVERSION_CHECKS = {
    "TARGET": NORM_TARGETS.get,
    "TRANSFER": check_transfer,
    "NUM_GROUPS": lambda value: check_group_args(num_groups=value),
    "DIM_PER_GROUP": lambda value: value == 0 or check_group_args(dim_per_group=value),
    "EPS": lambda value: value == 0 or _positive_number(value),
}

OPTIMIZERS = ("SGD", "AdamW")  # SOLVER.OPTIMIZER


def check_config(cfg: CfgNode) -> None:
    """Check the values of gn_det's keys (whether or not conversion is enabled).

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.
    """
    optimizer = cfg.SOLVER.get("OPTIMIZER", "SGD")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"SOLVER.OPTIMIZER = {optimizer!r}: valid optimizers: {', '.join(OPTIMIZERS)}")
    node = cfg.MODEL.get("NORM_CONVERSION")
    if node is None:
        return
    for key, check in _CONVERSION_CHECKS.items():
        try:
            check(node[key])
        except ValueError as e:
            raise ConfigError(f"MODEL.NORM_CONVERSION.{key} = {node[key]!r}: {e}") from e


_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: ([\w.]+)")


def _explain(cfg: CfgNode, error: Exception) -> str:
    """One line for a yacs merge error; for an unknown key, the keys its parent node has."""
    message = " ".join(str(error.args[0] if error.args else error).split())
    match = _UNKNOWN_KEY.search(message)
    if not match:
        return message
    key = match.group(1)
    node, known = cfg, []
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            break
        node, known = node[part], known + [part]
    if not isinstance(node, CfgNode):
        return f"unknown config key {key}"
    where = ".".join(known)
    close = difflib.get_close_matches(part, list(node), n=1)
    hint = f"did you mean {where + '.' if where else ''}{close[0]}? " if close else ""
    return f"unknown config key {key}; {hint}{where or 'the config'} has: {', '.join(sorted(node))}"


def merge_overrides(cfg: CfgNode, opts) -> CfgNode:
    """``cfg.merge_from_list(opts)`` (``KEY VALUE`` pairs), then :func:`check_config`.

    Raises:
        ConfigError: one line naming the key (an unknown key with the keys its node has, a value
            of the wrong type, an odd-length list, a bad gn_det value).
    """
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(_explain(cfg, e)) from e
    check_config(cfg)
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
    return NormSpec(
        target=node.TARGET,
        num_groups=node.NUM_GROUPS,
        dim_per_group=node.DIM_PER_GROUP or None,
        eps=node.EPS or None,
        transfer=node.TRANSFER,
        include=tuple(node.INCLUDE),
        exclude=tuple(node.EXCLUDE),
    )


def convert_model_by_config(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """
    Convert ``model`` as ``cfg.MODEL.NORM_CONVERSION`` says (unchanged when disabled).

    ``FOLDED`` then gives the model the structure of ``gn-det convert --to folded``'s output
    (:func:`gn_det.folding.folded_architecture`, GroupNorm layers under ``FOLDED_EXCLUDE``
    kept), and ``RECOMPUTE`` applies :func:`gn_det.enable_recompute` to the GroupNorm layers
    left — also those the model was built with (detectron2's native GN configs), whether or
    not ``ENABLED`` is set.
    """
    spec = norm_spec_from_config(cfg)
    if spec is not None:
        model = convert_norm_by_spec(model, spec)
    node = cfg.MODEL.get("NORM_CONVERSION")
    if node is not None and node.get("FOLDED", False):
        from .folding import folded_architecture

        folded_architecture(model, exclude=tuple(node.get("FOLDED_EXCLUDE", ())))
    if node is not None and node.get("RECOMPUTE", False):
        enable_recompute(model)
    return model


def _converting(meta_arch):
    @functools.wraps(meta_arch, updated=())
    def build(*args, **kwargs):
        model = meta_arch(*args, **kwargs)
        cfg = args[0] if args and isinstance(args[0], CfgNode) else kwargs.get("cfg")
        return convert_model_by_config(model, cfg) if isinstance(cfg, CfgNode) else model

    return build


class _ConvertingLookup(dict):
    """A registry table whose ``get`` wraps meta-architectures so that they convert on build."""

    def get(self, name, default=None):
        obj = super().get(name, default)
        return obj if obj is None or obj is default else _converting(obj)


def _install_build_hook() -> None:
    if not isinstance(META_ARCH_REGISTRY._obj_map, _ConvertingLookup):
        META_ARCH_REGISTRY._obj_map = _ConvertingLookup(META_ARCH_REGISTRY._obj_map)


_install_build_hook()


class UnsafeConfigError(ValueError):
    """A config needs ``yaml.unsafe_load`` (Python tags: code that runs on load)."""


_URL_PREFIXES = ("http://", "https://", "detectron2://")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parser error in one line, with the line and column it gives (1-based)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _check_structure(data: dict, node: CfgNode, path: Path, prefix: str = "") -> None:
    """A section of the config (``MODEL``, ``MODEL.RESNETS``) must be a mapping in the file."""
    for key, value in data.items():
        default = node.get(key) if isinstance(node, CfgNode) else None
        if isinstance(default, CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {prefix}{key} is a section of keys, but the file gives it "
                                  f"{value!r}; write it as '{key}:' followed by indented 'KEY: value' lines")
            _check_structure(value, default, path, f"{prefix}{key}.")


def _check_yaml_files(path: Path, allow_unsafe: bool, seen=None) -> None:
    """Read ``path`` and its ``_BASE_`` chain as YAML before yacs merges them, so that a file
    that is not a config is one line naming it: a syntax error (line, column), an empty file,
    a top level that is not a mapping, a missing ``_BASE_``, a section given a value; and,
    unless ``allow_unsafe``, a file that needs ``yaml.unsafe_load``."""
    seen = set() if seen is None else seen
    if path in seen:
        return
    seen.add(path)
    try:
        with open(path, "r") as f:
            data = (yaml.unsafe_load if allow_unsafe else yaml.safe_load)(f)
    except yaml.constructor.ConstructorError as e:
        raise UnsafeConfigError(
            f"{path} needs unsafe YAML (it constructs Python objects, which runs code on load: "
            f"{e.problem}). Rewrite the value as plain YAML, or pass --allow-unsafe-yaml if "
            "you trust the file."
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from e
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of KEY: value lines at its top level; "
                          f"this file holds a {type(data).__name__}")
    _check_structure(data, get_cfg(), path)
    base = data.get("_BASE_")
    if base is None:
        return
    if not isinstance(base, str):
        raise ConfigError(f"{path}: _BASE_ must be a file name, got {base!r}")
    if base.startswith(_URL_PREFIXES):
        return
    base_path = (path.parent / os.path.expanduser(base)).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: its _BASE_ {base!r} does not exist (looked for {base_path})")
    _check_yaml_files(base_path, allow_unsafe, seen)


def _model_zoo_config(name: str) -> Optional[Path]:
    """detectron2's model-zoo config ``name`` (``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``,
    ``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``), if the installed detectron2 has it."""
    with warnings.catch_warnings():  # detectron2's model_zoo imports pkg_resources
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        from detectron2 import model_zoo

    for candidate in (name, f"{name}.yaml"):
        try:
            return Path(model_zoo.get_config_file(candidate))
        except RuntimeError:  # "... not available in Model Zoo!"
            continue
    return None


def resolve_config_name(name: Union[str, Path]) -> Path:
    """
    The config file ``name`` means, looked up in this order:

    1. an existing path, as given;
    2. one of gn_det's configs (:data:`CONFIGS_DIR`: ``gn_mask_rcnn.yaml``, ``shapes/gn.yaml``;
       the ``.yaml`` suffix may be left off), in a checkout and in an installed wheel alike;
    3. a config of detectron2's model zoo (``Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml``,
       ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``), as
       ``detectron2.model_zoo.get_config_file`` finds it.

    Raises:
        FileNotFoundError: naming the places looked at and listing gn_det's configs.
    """
    path = Path(name)
    if path.is_file():
        return path
    candidates = [CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml", CONFIGS_DIR / f"{name}.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    zoo = _model_zoo_config(str(name))
    if zoo is not None:
        return zoo
    available = sorted(
        str(p.relative_to(CONFIGS_DIR))
        for p in CONFIGS_DIR.rglob("*")
        if p.suffix in (".yaml", ".py") and not p.name.startswith(("Base-", "_"))
    )
    raise FileNotFoundError(
        f"No config {str(name)!r}: not a file, not in {CONFIGS_DIR}, nor in detectron2's model zoo "
        f"(e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml). "
        f"Available in gn_det: {', '.join(available) or '(none)'}"
    )


def load_config(path: Union[str, Path], *, allow_unsafe_yaml: bool = False) -> CfgNode:
    """
    A full config (detectron2 defaults + gn_det keys) merged from ``path`` and its ``_BASE_``s.

    detectron2 falls back to ``yaml.unsafe_load`` for files ``yaml.safe_load`` refuses (its
    ``Base-RetinaNet.yaml`` runs ``eval`` on load). This refuses them with
    :class:`UnsafeConfigError` unless ``allow_unsafe_yaml``. A file that is not a config
    (syntax error, empty, not a mapping, missing ``_BASE_``), a key the file sets that the
    config does not have, a value of the wrong type, or a bad value of gn_det's keys is a
    :class:`ConfigError`: one line naming the file.
    """
    path = Path(path)
    if path.suffix == ".py":
        raise ConfigError(f"{path}: a LazyConfig (Python) file; this command takes a YAML config")
    _check_yaml_files(path.resolve(), allow_unsafe_yaml)
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(path), allow_unsafe=allow_unsafe_yaml)
    except (KeyError, ValueError, AssertionError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: {_explain(cfg, e)}") from e
    check_config(cfg)
    return cfg
