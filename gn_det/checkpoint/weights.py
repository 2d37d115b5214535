"""What a checkpoint file holds, in every supported format (docs/cli.md), named for a model.

:func:`state_for_model` names a checkpoint's tensors as a model's state dict, with detectron2's
name matching where the format needs it, extended so that the BatchNorm statistics of a BN
checkpoint reach the GroupNorm layers conversion made (detectron2's matching drops every key the
model does not have, and a GN layer has no ``running_mean``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from torch import nn

from .io import CheckpointError, detect_format, load_checkpoint_file, load_safetensors_metadata
from .remote import local_weights_path
from .torchvision_names import _TORCHVISION_RESNET_KEY, torchvision_resnet_to_detectron2_state_dict

__all__ = [
    "BOTTOM_UP_PREFIX",
    "Weights",
    "first_shape_mismatches",
    "fit_summary",
    "norm_layers_in",
    "read_weights",
    "state_for_model",
    "torchvision_to_detectron2_resnet_names",
]

#: Where a detectron2 detector keeps its backbone body (ResNet, torchvision ResNet, ...).
BOTTOM_UP_PREFIX = "backbone.bottom_up."


@dataclasses.dataclass
class Weights:
    """
    A checkpoint's model weights, as tensors by the checkpoint's own names (``state``).

    Attributes:
        kind: ``"detectron2"``, ``"detectron2-model-zoo"``, ``"caffe2"``, ``"torchvision"`` or
            ``"safetensors"``.
        heuristics: the names need detectron2's suffix matching (ImageNet backbones, Caffe2).
        c2_names: the names are Caffe2/Detectron's (``res2_0_branch2a_w``).
        author: ``__author__`` of model-zoo files, else the kind.
        extra: the rest of a detectron2 training checkpoint (optimizer, ...), for resuming, or of
            a safetensors file's metadata (a folded checkpoint's ``fold_plan``).
    """

    state: Dict[str, torch.Tensor]
    kind: str
    heuristics: bool = False
    c2_names: bool = False
    author: str = ""
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _tensors(path: str, state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: model weights are a {type(state).__name__}, not a dict")
    tensors = {}
    for name, value in state.items():
        if torch.is_tensor(value):
            tensors[name] = value
        elif isinstance(value, np.ndarray):
            tensors[name] = torch.from_numpy(value.copy(order="C"))  # keeps 0-d arrays 0-d
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            tensors[name] = torch.tensor(value)
        # Other entries (Caffe2 blobs such as strings) carry no weights.
    if not tensors:
        raise CheckpointError(f"{path}: no weight tensors found")
    return tensors


def _is_torchvision_resnet(state: Dict[str, Any]) -> bool:
    return "conv1.weight" in state and all(_TORCHVISION_RESNET_KEY.match(k) for k in state)


def read_weights(path: str) -> Weights:
    """Load ``path`` safely and tell its format. ``path`` may be a URL (``detectron2://``,
    ``https://``): the file in detectron2's download cache, fetched if it is not there. Raises
    ``CheckpointError``."""
    path = local_weights_path(path)
    file_format = detect_format(path)
    raw = load_checkpoint_file(path)
    if file_format == "pickle":
        if "model" in raw and "__author__" in raw:
            author = str(raw["__author__"])
            return Weights(
                _tensors(path, raw["model"]),
                "detectron2-model-zoo",
                heuristics=bool(raw.get("matching_heuristics", False)),
                c2_names=author == "Caffe2",
                author=author,
            )
        blobs = raw.get("blobs", raw)
        blobs = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        return Weights(_tensors(path, blobs), "caffe2", True, True, "Caffe2")
    if file_format == "torch" and isinstance(raw.get("model"), dict):  # a detectron2 checkpoint
        extra = {k: v for k, v in raw.items()
                 if k not in ("model", "matching_heuristics", "__author__")}
        return Weights(
            _tensors(path, raw["model"]),
            "detectron2",
            heuristics=bool(raw.get("matching_heuristics", False)),
            author=str(raw.get("__author__", "detectron2")),
            extra=extra,
        )
    state = _tensors(path, raw)  # a bare state dict
    if _is_torchvision_resnet(state):
        return Weights(state, "torchvision", author="torchvision")
    if file_format == "safetensors":
        metadata = load_safetensors_metadata(path)
        return Weights(
            state,
            "safetensors",
            heuristics=metadata.get("matching_heuristics") == "True",
            author=metadata.get("__author__", "safetensors"),
            extra={k: v for k, v in metadata.items()
                   if k not in ("matching_heuristics", "__author__")},
        )
    return Weights(state, "detectron2", author="detectron2")


def torchvision_to_detectron2_resnet_names(
    state: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """A torchvision ResNet state dict renamed to detectron2's ResNet (``res2.0.conv1.norm...``),
    as detectron2's ``convert-torchvision-to-d2.py`` does; ``fc`` is dropped."""
    renamed = {}
    for name, value in state.items():
        if name.startswith("fc."):
            continue
        new = re.sub(r"^conv1\.", "stem.conv1.", name)
        new = re.sub(r"^bn1\.", "stem.conv1.norm.", new)
        new = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", new)
        new = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", new)
        new = new.replace(".downsample.0.", ".shortcut.")
        new = new.replace(".downsample.1.", ".shortcut.norm.")
        renamed[new] = value
    return renamed


def _model_keys_with_bn_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict plus BN-statistics keys for every layer that takes BN state on
    load (``load_bn_state``: :class:`gn_det.ConvertedGroupNorm`)."""
    keys = dict(model.state_dict())
    for name, module in model.named_modules():
        if callable(getattr(module, "load_bn_state", None)) and module.affine:
            prefix = f"{name}." if name else ""
            for stat in ("running_mean", "running_var"):
                keys[prefix + stat] = module.weight.detach()
    return keys


def state_for_model(weights: Weights, model: nn.Module) -> Dict[str, torch.Tensor]:
    """
    ``weights`` renamed to ``model``'s state-dict names, ready for ``load_state_dict``.

    torchvision ResNet weights map by prefix onto gn_det's torchvision backbone, or by name onto
    detectron2's ResNet. Suffix matching runs against the model's keys *plus* the BN statistics
    of each :class:`gn_det.ConvertedGroupNorm`, which transfers them on load.
    """
    state, heuristics, c2 = dict(weights.state), weights.heuristics, weights.c2_names
    model_keys = model.state_dict().keys()
    if weights.kind == "torchvision":
        if any(k.startswith(BOTTOM_UP_PREFIX + "layer1.") for k in model_keys):
            return dict(torchvision_resnet_to_detectron2_state_dict(state, BOTTOM_UP_PREFIX))
        state, heuristics = torchvision_to_detectron2_resnet_names(state), True
    if not heuristics:
        return state
    return align_and_update_state_dicts(_model_keys_with_bn_state(model), state, c2_conversion=c2)


def first_shape_mismatches(
    state: Dict[str, torch.Tensor], model: nn.Module, limit: int = 3
) -> Optional[str]:
    """``"name: checkpoint (a, b) vs model (c, d); ..."`` for the first mismatches, else None."""
    model_state = model.state_dict()
    mismatches = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in state.items()
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)
    ]
    if not mismatches:
        return None
    more = f" (+{len(mismatches) - limit} more)" if len(mismatches) > limit else ""
    return "; ".join(mismatches[:limit]) + more


#: The share of the backbone body's values (its tensors' elements) a checkpoint must set, as a
#: fraction: fine-tuning sets all of it (heads missing or of other shapes); a new backbone
#: layer (deformable offsets) costs a few per cent; another architecture's checkpoint whose
#: names and some shapes coincide (an R-50 into an R-18) sets about half (docs/troubleshooting.md).
MIN_BACKBONE_SHARE = 0.9


def _first_modules(keys, depth: Optional[int] = None, limit: int = 3) -> str:
    modules = list(dict.fromkeys(".".join(k.split(".")[:-1][:depth]) or k for k in keys))
    more = f" (+{len(modules) - limit} more)" if len(modules) > limit else ""
    return ", ".join(modules[:limit]) + more


def fit_summary(model_state: Dict[str, torch.Tensor], missing: List[str],
                other_shapes: List[str], path: str) -> Tuple[str, bool]:
    """One line on what a checkpoint at ``path`` set of a model (its ``model_state``), given the
    keys it left ``missing`` and those it had in ``other_shapes``, and whether it left part of
    the backbone body (the model's ``backbone.bottom_up.``, else ``backbone.``, else all of it)
    or a tensor of another shape as built. Raises ``CheckpointError`` when it sets less than
    :data:`MIN_BACKBONE_SHARE` of the backbone body."""
    not_set = set(missing) | set(other_shapes)
    prefix = next((p for p in (BOTTOM_UP_PREFIX, "backbone.")
                   if any(k.startswith(p) for k in model_state)), "")
    body = [k for k in model_state if k.startswith(prefix)]
    share = (sum(model_state[k].numel() for k in body if k not in not_set)
             / max(sum(model_state[k].numel() for k in body), 1))
    sets = (f"{path}: sets {len(model_state) - len(not_set & set(model_state))} of the model's "
            f"{len(model_state)} tensors and {share:.0%} of its backbone's values")
    if share < MIN_BACKBONE_SHARE:
        first = _first_modules([k for k in body if k in not_set])
        raise CheckpointError(f"{sets} ({prefix.rstrip('.') or 'the model'}; gn_det loads one that "
                              f"sets at least {MIN_BACKBONE_SHARE:.0%}): first not set: {first}; "
                              "is it the checkpoint of another config's model?")
    missing = [k for k in missing if k not in other_shapes]
    parts = [sets]
    if other_shapes:
        parts.append(f"of other shapes, left as built: {_first_modules(other_shapes)}")
    if missing:
        parts.append(f"{len(missing)} not in the checkpoint ({_first_modules(missing, 1)})")
    return "; ".join(parts), bool(other_shapes) or any(k in not_set for k in body)


_C2_NORM = re.compile(r"^(?P<layer>.+)_(?P<kind>bn|gn)_s$")


def norm_layers_in(weights: Weights) -> List[Tuple[str, str, int]]:
    """
    The normalisation layers a checkpoint holds, from its tensor names alone:
    ``(layer, kind, channels)``, kind one of ``"BN"`` (with running statistics),
    ``"BN, fused (affine only)"`` (Caffe2 ``_bn_s``), ``"GN"`` (Caffe2 ``_gn_s``) and
    ``"affine only (FrozenBN-fused or GN)"`` (a ``norm``/``bn`` layer without statistics).
    A checkpoint does not record GN groups.
    """
    rows = []
    state = weights.state
    for name, value in state.items():
        match = _C2_NORM.match(name) if weights.c2_names else None
        if match:
            kind = "GN" if match.group("kind") == "gn" else "BN, fused (affine only)"
            rows.append((match.group("layer"), kind, value.numel()))
            continue
        if not name.endswith(".weight") or value.dim() != 1:
            continue
        layer = name[: -len(".weight")]
        if f"{layer}.running_var" in state:
            rows.append((layer, "BN", value.numel()))
        elif re.search(r"(^|\.)(norm|bn\d*)$", layer):
            rows.append((layer, "affine only (FrozenBN-fused or GN)", value.numel()))
    return rows
