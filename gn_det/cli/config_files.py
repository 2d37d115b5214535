"""Config files as the command line meets them: a name looked up in gn_det's configs or
detectron2's model zoo, the file and its ``_BASE_`` chain checked as YAML before yacs merges
them, ``KEY VALUE`` overrides; each problem one line naming the file and the key."""

from __future__ import annotations

import difflib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import yaml
from detectron2.config import CfgNode

from ..config import ConfigError, check_config, get_cfg, route_meta_architecture

__all__ = [
    "CONFIGS_DIR",
    "UnsafeConfigError",
    "load_config",
    "merge_overrides",
    "resolve_config_name",
]


def _configs_dir() -> Path:
    """gn_det's configs: ``$GN_DET_CONFIGS`` if set; else the package's own ``configs/`` (an
    installed wheel carries the repository's ``configs/`` there as package data); else the
    checkout's top-level ``configs/`` (an editable install or a source tree on ``sys.path``)."""
    override = os.environ.get("GN_DET_CONFIGS")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent.parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


#: The folder config names are resolved in (see :func:`_configs_dir`).
CONFIGS_DIR = _configs_dir()


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
    """``cfg.merge_from_list(opts)`` (``KEY VALUE`` pairs), then ``check_config`` and
    :func:`gn_det.config.route_meta_architecture`.

    Raises:
        ConfigError: one line naming the key (an unknown key with the keys its node has, a value
            of the wrong type, an odd-length list, a bad gn_det value).
    """
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(_explain(cfg, e)) from e
    check_config(cfg)
    return route_meta_architecture(cfg)


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
                raise ConfigError(f"{path}: {prefix}{key} is a section of keys, but the file "
                                  f"gives it {value!r}; write it as '{key}:' followed by indented "
                                  "'KEY: value' lines")
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
    """The model-zoo config ``name`` (``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``,
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


def _in_model_zoo(path: Path) -> bool:
    """Whether ``path`` is a config shipped inside the installed detectron2 (its model zoo)."""
    import detectron2

    zoo = Path(detectron2.__file__).resolve().parent / "model_zoo" / "configs"
    return zoo in path.resolve().parents


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
    :class:`UnsafeConfigError` unless ``allow_unsafe_yaml`` or the file is one of the
    installed detectron2's own model-zoo configs. A file that is not a config
    (syntax error, empty, not a mapping, missing ``_BASE_``), a key the file sets that the
    config does not have, a value of the wrong type, or a bad value of gn_det's keys is a
    :class:`ConfigError`: one line naming the file. The config comes routed to the
    ``NormConverted`` meta-architecture when it asks for conversion
    (:func:`gn_det.config.route_meta_architecture`).
    """
    path = Path(path)
    if path.suffix == ".py":
        raise ConfigError(f"{path}: a LazyConfig (Python) file; this command takes a YAML config")
    trusted = allow_unsafe_yaml or _in_model_zoo(path)
    _check_yaml_files(path.resolve(), trusted)
    cfg = get_cfg()
    fvcore_log = logging.getLogger("fvcore.common.config")  # would warn of the unsafe load allowed
    disabled, fvcore_log.disabled = fvcore_log.disabled, trusted
    try:
        cfg.merge_from_file(str(path), allow_unsafe=trusted)
    except (KeyError, ValueError, AssertionError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: {_explain(cfg, e)}") from e
    finally:
        fvcore_log.disabled = disabled
    check_config(cfg)
    return route_meta_architecture(cfg)
