"""Turn a BN-trained checkpoint into a GN checkpoint that a GN config loads with nothing missing.

The pipeline (:func:`convert_checkpoint`): read the file safely → load it into the *source*
config's BN model (so every BN statistic lands in a live BN layer) → ``convert_norm`` (the
weight transfer happens there) → write the converted state atomically to a temporary file next
to the output → load that file into the *target* config's model through the training loader and
check it fits → rename it into place. Any failure leaves no output and an existing one untouched.

Full detector checkpoints stay full detector checkpoints. Backbone-only (ImageNet) checkpoints
become a GN backbone checkpoint in detectron2's ImageNet-pretrained format (``stem.conv1.*``,
``res2.0.conv1.norm.*``, loaded by name matching), usable directly as ``MODEL.WEIGHTS``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from torch import nn

from ..calibration import LayerFit, calibrate
from ..convert import NormSpec, convert_norm_by_spec
from ..distillation import distill
from ..modeling.meta_arch import build_model
from ..report import describe_norms
from .checkpointer import Checkpointer
from .io import CheckpointError, save_checkpoint_file
from .weights import (
    BOTTOM_UP_PREFIX,
    Weights,
    first_shape_mismatches,
    read_weights,
    state_for_model,
)

__all__ = [
    "ConversionResult",
    "FILE_FORMATS",
    "INPUT_CONVENTION_KEYS",
    "check_input_conventions",
    "FoldResult",
    "convert_checkpoint",
    "fold_checkpoint",
    "format_for_output",
]

FILE_FORMATS = {".pth": "pth", ".pkl": "pkl", ".safetensors": "safetensors"}
_IGNORED_MODEL_KEYS = ("pixel_mean", "pixel_std")


@dataclasses.dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` did (all counts refer to model tensors)."""

    output: Path
    input_kind: str  # Weights.kind of the input
    scope: str  # "detector" or "backbone"
    conversions: Dict[Tuple[str, str], int]  # (source type, target type) -> layers
    groups: Dict[int, int]  # GN groups -> layers
    transfer: str
    fits: Optional[List[LayerFit]]  # calibration, layer by layer (None: not calibrated)
    keys_matched: int  # output tensors equal after loading into the target model
    keys_expected: int  # tensors of the target model the output must provide
    seconds: float
    source_model: nn.Module  # the BN model with the input weights (for verify-images)
    target_model: nn.Module  # the target model loaded from the output file


def format_for_output(output: Path, requested: Optional[str]) -> str:
    """File format from ``--format`` or the output's extension; conflicting ones are an error."""
    by_extension = FILE_FORMATS.get(output.suffix.lower())
    if requested is not None and by_extension is not None and requested != by_extension:
        raise CheckpointError(
            f"{output}: --format {requested} conflicts with the '{output.suffix}' extension"
        )
    return requested or by_extension or "pth"


def _without_conversion(cfg: CfgNode) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.NORM_CONVERSION.ENABLED = False
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _target_config(source_cfg: CfgNode, target_cfg: Optional[CfgNode], spec: NormSpec) -> CfgNode:
    if target_cfg is None:
        cfg = source_cfg.clone()
        cfg.defrost()
        node = cfg.MODEL.NORM_CONVERSION
        node.ENABLED, node.TARGET, node.TRANSFER = True, spec.target, spec.transfer
        node.NUM_GROUPS, node.DIM_PER_GROUP = spec.num_groups, spec.dim_per_group or 0
        node.EPS = spec.eps or 0.0
        node.INCLUDE, node.EXCLUDE = list(spec.include), list(spec.exclude)
    else:
        cfg = target_cfg.clone()
        cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


#: Config keys that say how a model reads its input: weights trained under one setting are wrong
#: under another (MSRA's ImageNet ResNets: BGR, std 1, stride in the 1x1 conv; torchvision's:
#: RGB, std-normalised, stride in the 3x3), though every tensor still fits.
INPUT_CONVENTION_KEYS = ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD",
                         "MODEL.RESNETS.STRIDE_IN_1X1")


def _value(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


def check_input_conventions(source_cfg: CfgNode, target_cfg: CfgNode) -> None:
    """Refuse a target config that would feed the weights inputs they were not trained on.

    Raises:
        CheckpointError: naming each key of :data:`INPUT_CONVENTION_KEYS` that differs.
    """
    differ = [f"{key} {_value(source_cfg, key)} -> {_value(target_cfg, key)}"
              for key in INPUT_CONVENTION_KEYS
              if _value(source_cfg, key) != _value(target_cfg, key)]
    if differ:
        raise CheckpointError(
            "the target config reads images differently from the source config the weights were "
            f"trained with ({'; '.join(differ)}), so the converted model would see inputs it was "
            "not trained on; train with the source config and MODEL.NORM_CONVERSION.ENABLED True, "
            "or give the target config the source's values"
        )


def _load_into_source(weights: Weights, model: nn.Module, path: str) -> List[str]:
    state = state_for_model(weights, model)
    mismatch = first_shape_mismatches(state, model)
    if mismatch:
        raise CheckpointError(f"{path}: does not fit the source config's model: {mismatch}")
    model_keys = set(model.state_dict())
    matched = sorted(k for k in state if k in model_keys)
    if not [k for k in matched if k not in _IGNORED_MODEL_KEYS]:
        raise CheckpointError(
            f"{path}: none of its {len(state)} tensors match the source config's model "
            f"(first: {next(iter(state))!r}); is --config-file the model it was trained with?"
        )
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    return matched


def _output_object(model: nn.Module, scope: str, file_format: str) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    heuristics = scope == "backbone"
    if heuristics:
        state = {k[len(BOTTOM_UP_PREFIX):]: v for k, v in state.items()
                 if k.startswith(BOTTOM_UP_PREFIX)}
    if file_format == "safetensors":  # its metadata holds strings only
        return {"model": state, "__author__": "gn_det", "matching_heuristics": str(heuristics)}
    return {"model": state, "__author__": "gn_det", "matching_heuristics": heuristics}


def _verify(target: nn.Module, converted: nn.Module, file: Path, scope: str) -> Tuple[int, int]:
    incompatible = Checkpointer(target).load_weights(str(file))
    expected = {
        k for k in target.state_dict()
        if k not in _IGNORED_MODEL_KEYS and (scope == "detector" or k.startswith(BOTTOM_UP_PREFIX))
    }
    missing = sorted(set(incompatible.missing_keys) & expected)
    unexpected = sorted(incompatible.unexpected_keys)
    wrong = [k for k, _, _ in incompatible.incorrect_shapes]
    if missing or unexpected or wrong:
        problems = [f"{n} {what} (first: {keys[0]})" for what, keys, n in (
            ("missing", missing, len(missing)), ("unexpected", unexpected, len(unexpected)),
            ("of the wrong shape", wrong, len(wrong))) if keys]
        raise CheckpointError(f"{file}: the converted weights do not fit the target model: "
                              + "; ".join(problems))
    reference = converted.state_dict()
    loaded = target.state_dict()
    matched = sum(1 for k in expected if k in reference and torch.equal(loaded[k], reference[k]))
    return matched, len(expected)


def _write_verified(model: nn.Module, target: nn.Module, output_path: Path, scope: str,
                    file_format: str, overwrite: bool) -> Tuple[int, int]:
    """Write ``model``'s state to a temporary file beside ``output_path``, load it into
    ``target`` through the training loader and check it fits, then rename it into place.
    Returns (keys matched, keys expected); any failure leaves no output."""
    fd, temporary = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".verify",
                                     dir=output_path.parent)
    os.close(fd)
    os.unlink(temporary)
    try:
        save_checkpoint_file(_output_object(model, scope, file_format), temporary,
                             file_format=file_format)
        matched = _verify(target, model, Path(temporary), scope)
        if output_path.exists() and not overwrite:
            raise CheckpointError(f"{output_path}: appeared during conversion; "
                                  "pass --force to overwrite")
        os.replace(temporary, output_path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return matched


def _check_output(output: str, file_format: Optional[str], overwrite: bool) -> Tuple[Path, str]:
    output_path = Path(output)
    file_format = format_for_output(output_path, file_format)
    if output_path.exists() and not overwrite:
        raise CheckpointError(f"{output_path}: exists; pass --force to overwrite")
    if not output_path.parent.is_dir():
        raise CheckpointError(f"{output_path}: folder {output_path.parent} does not exist")
    return output_path, file_format


@dataclasses.dataclass
class FoldResult:
    """What :func:`fold_checkpoint` did."""

    output: Path
    input_kind: str
    report: object  # gn_det.folding.FoldReport
    keys_matched: int
    keys_expected: int
    seconds: float
    source_model: nn.Module  # the GN model with the input weights
    target_model: nn.Module  # the folded model loaded from the output file


def fold_checkpoint(weights_path: str, output: str, cfg: CfgNode, *, images=None,
                    exclude: Sequence[str] = (), distill_steps: int = 100,
                    file_format: Optional[str] = None, overwrite: bool = False) -> FoldResult:
    """
    Fold the GN model of ``cfg`` with the weights at ``weights_path`` for inference
    (:func:`gn_det.folding.fold_for_inference`: statistics from ``images``, or data-free
    without; ``distill_steps`` of distillation; GroupNorm kept under ``exclude``) and write it
    to ``output``, verified: the model ``cfg`` builds with ``MODEL.NORM_CONVERSION.FOLDED``
    (and ``FOLDED_EXCLUDE``) must load it with nothing missing. Atomic, as
    :func:`convert_checkpoint`.

    Raises:
        CheckpointError: a bad input or output, weights that do not fit, a model with no
            GroupNorm to fold; nothing is written.
    """
    from ..folding import fold_for_inference

    start = time.perf_counter()
    output_path, file_format = _check_output(output, file_format, overwrite)
    weights = read_weights(weights_path)
    source_cfg = cfg.clone()
    source_cfg.defrost()
    source_cfg.MODEL.DEVICE, source_cfg.MODEL.WEIGHTS = "cpu", ""
    source_cfg.MODEL.NORM_CONVERSION.FOLDED = False
    source = build_model(source_cfg).eval()
    matched = _load_into_source(weights, source, weights_path)
    scope = "detector" if any(not k.startswith(BOTTOM_UP_PREFIX) and k not in _IGNORED_MODEL_KEYS
                              for k in matched) else "backbone"
    try:
        folded, report = fold_for_inference(
            source, images, exclude=exclude,
            distill_steps=distill_steps if images is not None else 0)
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: {e}") from e
    target_cfg = source_cfg.clone()
    target_cfg.MODEL.NORM_CONVERSION.FOLDED = True
    target_cfg.MODEL.NORM_CONVERSION.FOLDED_EXCLUDE = list(exclude)
    target = build_model(target_cfg)
    keys_matched, keys_expected = _write_verified(folded, target, output_path, scope, file_format,
                                                  overwrite)
    return FoldResult(output_path, weights.kind, report, keys_matched, keys_expected,
                      time.perf_counter() - start, source, target)


_DISTILLED = {"weights": "GN affine, ROI-head weights", "norms": "GN affine",
              "none": "backbone GN affine"}


def _fit(converted, source, inputs, least_squares: bool, distill_steps: int, distill_heads: str):
    """Calibrate and distill ``converted`` against ``source`` on ``inputs`` (if any); returns
    the calibration's fits (or None) and what the distillation could train in the heads."""
    if inputs is None:
        return None, distill_heads
    fits = calibrate(converted, source, inputs) if least_squares else None
    if distill_steps > 0:
        distill_heads = distill(converted, source, inputs, steps=distill_steps,
                                heads=distill_heads).heads
    return fits, distill_heads


def convert_checkpoint(
    weights_path: str,
    output: str,
    source_cfg: CfgNode,
    spec: NormSpec,
    *,
    target_cfg: Optional[CfgNode] = None,
    file_format: Optional[str] = None,
    overwrite: bool = False,
    calibration_inputs: Optional[list] = None,
    distill_steps: int = 0,
    least_squares: bool = True,
    distill_heads: str = "weights",
) -> ConversionResult:
    """
    Convert the checkpoint at ``weights_path`` (any supported format) and write ``output``.

    Args:
        source_cfg: config of the model the weights were trained for (its BN-family norms);
            conversion in it is ignored.
        spec: the conversion (target GN, groups, transfer). When ``target_cfg`` enables
            ``MODEL.NORM_CONVERSION`` the caller should pass its spec.
        target_cfg: config whose model must load the output; default: ``source_cfg`` with
            ``spec`` switched on. It must read images as ``source_cfg`` does
            (:func:`check_input_conventions`).
        file_format: ``"pth"``, ``"pkl"`` or ``"safetensors"``; default from the extension.
        overwrite: replace an existing ``output``.
        calibration_inputs: if given, detectron2 model inputs (dicts with ``"image"``) on which
            the converted model is calibrated against the source BN model after the transfer
            (``gn_det.calibrate``).
        distill_steps: if positive (with ``calibration_inputs``), that many steps of
            ``gn_det.distill`` on the same inputs follow the calibration.
        least_squares: with ``calibration_inputs``, run ``gn_det.calibrate``; False: only the
            distillation (from the transfer), which keeps more of a detector's AP
            (docs/benchmarks.md).
        distill_heads: what the distillation trains in the ROI heads (``gn_det.distill``'s
            ``heads``) of a detector checkpoint. A backbone checkpoint's heads are untrained,
            so it is distilled on the backbone's outputs alone (``"none"``) whatever this says.

    Raises:
        CheckpointError: any problem with the input, the fit, or the output; nothing written.
    """
    start = time.perf_counter()
    output_path, file_format = _check_output(output, file_format, overwrite)
    if target_cfg is not None:
        check_input_conventions(source_cfg, target_cfg)
    weights = read_weights(weights_path)

    source = build_model(_without_conversion(source_cfg)).eval()
    matched = _load_into_source(weights, source, weights_path)
    outside_backbone = [k for k in matched
                        if not k.startswith(BOTTOM_UP_PREFIX) and k not in _IGNORED_MODEL_KEYS]
    scope = "detector" if outside_backbone else "backbone"

    converted = convert_norm_by_spec(copy.deepcopy(source), spec)
    fits, distill_heads = _fit(converted, source, calibration_inputs, least_squares, distill_steps,
                               "none" if scope == "backbone" else distill_heads)
    rows = [r for r in describe_norms(converted) if r.source]
    conversions = collections.Counter((r.source, r.type) for r in rows)
    groups = collections.Counter(r.groups for r in rows if r.groups)
    target = build_model(_target_config(source_cfg, target_cfg, spec))
    keys_matched, keys_expected = _write_verified(converted, target, output_path, scope,
                                                  file_format, overwrite)
    return ConversionResult(
        output=output_path,
        input_kind=weights.kind,
        scope=scope,
        conversions=dict(conversions),
        groups=dict(groups),
        transfer=(spec.transfer + (" + calibrate" if fits is not None else "")
                  + (f" + distill {distill_steps} steps ({_DISTILLED[distill_heads]})"
                     if calibration_inputs is not None and distill_steps > 0 else "")),
        fits=fits,
        keys_matched=keys_matched,
        keys_expected=keys_expected,
        seconds=time.perf_counter() - start,
        source_model=source,
        target_model=target,
    )

