"""Turn a BN-trained checkpoint into a GN checkpoint that a GN config loads with nothing missing.

The weights are loaded into the *source* config's BN model (so every BN statistic lands in a live
BN layer) and converted there; the result is written to a temporary file beside the output, loaded
into the *target* config's model through the training loader, and renamed into place only if it
fits (docs/cli.md). Any failure leaves no output and an existing one untouched.
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
from .checkpointer import Checkpointer, check_weight_standardization
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
    "check_output",
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


def _model_config(cfg: CfgNode, device: Optional[str] = None, **norm_conversion) -> CfgNode:
    """A copy of ``cfg`` building without weights (on ``device``, else its own), its
    NORM_CONVERSION updated."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = device or cfg.MODEL.DEVICE, ""
    cfg.MODEL.NORM_CONVERSION.update(norm_conversion)
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
    """Refuse a target config that would feed the weights inputs they were not trained on: a
    CheckpointError naming each key of :data:`INPUT_CONVENTION_KEYS` that differs."""
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


def _source_model(path: str, cfg: CfgNode) -> Tuple[Weights, nn.Module, str, List[str]]:
    """The weights at ``path``, the model ``cfg`` builds with them loaded, their scope:
    "detector" if they fill more than its backbone, else "backbone", and the model's BN
    statistics (``running_mean``) they did not set."""
    weights = read_weights(path)
    model = build_model(cfg).eval()
    check_weight_standardization(path, weights, model)
    state = state_for_model(weights, model)
    mismatch = first_shape_mismatches(state, model)
    if mismatch:
        raise CheckpointError(f"{path}: does not fit the source config's model: {mismatch}")
    model_keys = set(model.state_dict())
    matched = sorted(k for k in state if k in model_keys)
    fitted = [k for k in matched if k not in _IGNORED_MODEL_KEYS]
    if not fitted:
        raise CheckpointError(
            f"{path}: none of its {len(state)} tensors match the source config's model "
            f"(first: {next(iter(state))!r}); is --config-file the model it was trained with?"
        )
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    detector = any(not k.startswith(BOTTOM_UP_PREFIX) for k in fitted)
    no_statistics = [k for k in model_keys if k.endswith(".running_mean") and k not in state
                     and (detector or k.startswith(BOTTOM_UP_PREFIX))]
    return weights, model, "detector" if detector else "backbone", no_statistics


def _output_object(model: nn.Module, scope: str, file_format: str) -> dict:
    from ..folding import fold_plan_metadata
    from ..standardization import ws_metadata

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    heuristics = scope == "backbone"
    if heuristics:
        state = {k[len(BOTTOM_UP_PREFIX):]: v for k, v in state.items()
                 if k.startswith(BOTTOM_UP_PREFIX)}
    if file_format == "safetensors":  # its metadata holds strings only
        heuristics = str(heuristics)
    return {"model": state, "__author__": "gn_det", "matching_heuristics": heuristics,
            **fold_plan_metadata(model), **ws_metadata(model)}


def _verify(target: nn.Module, converted: nn.Module, file: Path, scope: str) -> Tuple[int, int]:
    incompatible = Checkpointer(target).load_weights(str(file))
    expected = {
        k for k in target.state_dict()
        if k not in _IGNORED_MODEL_KEYS and (scope == "detector" or k.startswith(BOTTOM_UP_PREFIX))
    }
    missing = sorted(set(incompatible.missing_keys) & expected)
    unexpected = sorted(incompatible.unexpected_keys)
    wrong = [k for k, _, _ in incompatible.incorrect_shapes]
    problems = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in (
        ("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{file}: the converted weights do not fit the target model: "
                              + "; ".join(problems))
    reference = converted.state_dict()
    loaded = target.state_dict()
    matched = sum(1 for k in expected if k in reference and torch.equal(loaded[k], reference[k]))
    return matched, len(expected)


def _write_verified(model: nn.Module, target: nn.Module, output_path: Path, scope: str,
                    file_format: str, overwrite: bool) -> Tuple[int, int]:
    """Write ``model``'s state beside ``output_path``, and rename it into place once ``target``
    loads it; returns (keys matched, keys expected)."""
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


def check_output(output: str, file_format: Optional[str], overwrite: bool,
                 folded: bool = False, standardized: bool = False) -> Tuple[Path, str]:
    """The output path and its format; CheckpointError if it cannot be written there (or, for a
    ``folded`` or ``standardized`` (GN + WS) model, as pkl, which keeps no metadata)."""
    output_path = Path(output)
    file_format = format_for_output(output_path, file_format)
    if output_path.is_dir():
        raise CheckpointError(f"{output_path}: is a folder; --output names the file to write")
    if folded and file_format == "pkl":
        raise CheckpointError(f"{output_path}: a folded checkpoint is written as pth or "
                              "safetensors, whose metadata keep its fold plan")
    if standardized and file_format == "pkl":
        raise CheckpointError(f"{output_path}: a GN + Weight Standardization checkpoint is "
                              "written as pth or safetensors, whose metadata say that its convs "
                              "standardise their weights")
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
    to ``output`` as :func:`convert_checkpoint` does, verified against the model ``cfg`` builds
    with ``MODEL.NORM_CONVERSION.FOLDED`` (and ``FOLDED_EXCLUDE``). Raises CheckpointError (a
    bad input or output, weights that do not fit, no GroupNorm to fold), writing nothing.
    """
    from ..folding import fold_for_inference

    start = time.perf_counter()
    output_path, file_format = check_output(output, file_format, overwrite, folded=True)
    weights, source, scope, _ = _source_model(weights_path, _model_config(cfg, FOLDED=False))
    try:
        folded, report = fold_for_inference(
            source, images, exclude=exclude,
            distill_steps=distill_steps if images is not None else 0)
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: {e}") from e
    target = build_model(_model_config(cfg, FOLDED=True, FOLDED_EXCLUDE=list(exclude)))
    keys_matched, keys_expected = _write_verified(folded, target, output_path, scope, file_format,
                                                  overwrite)
    return FoldResult(output_path, weights.kind, report, keys_matched, keys_expected,
                      time.perf_counter() - start, source, target)


_DISTILLED = {"weights": "GN affine, ROI-head weights", "norms": "GN affine",
              "none": "backbone GN affine"}


def _fit(converted, source, transfer: str, inputs, least_squares: bool, distill_steps: int,
         heads: str):
    """Calibrate and distill ``converted`` against ``source`` on ``inputs`` (if any); returns
    the calibration's fits (or None) and the whole transfer, as printed."""
    if inputs is None:
        return None, transfer
    fits = calibrate(converted, source, inputs) if least_squares else None
    if fits is not None:
        transfer += " + calibrate"
    if distill_steps > 0:
        heads = distill(converted, source, inputs, steps=distill_steps, heads=heads).heads
        transfer += f" + distill {distill_steps} steps ({_DISTILLED[heads]})"
    return fits, transfer


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
    Convert the checkpoint at ``weights_path`` (any supported format) and write ``output``;
    raises CheckpointError (any problem with the input, the fit or the output), writing nothing.

    Args:
        source_cfg: config of the model the weights were trained for; conversion in it is ignored.
        spec: the conversion; pass the spec of a ``target_cfg`` that enables conversion.
        target_cfg: config whose model must load the output; default: ``source_cfg`` with
            ``spec`` switched on. It must read images as ``source_cfg`` does
            (:func:`check_input_conventions`).
        file_format: ``"pth"``, ``"pkl"`` or ``"safetensors"``; default from the extension.
        calibration_inputs: detectron2 model inputs (dicts with ``"image"``) on which the
            converted model is fitted to the source BN model after the transfer.
        distill_steps: with ``calibration_inputs``, steps of ``gn_det.distill`` after the
            calibration.
        least_squares: with ``calibration_inputs``, run ``gn_det.calibrate``; False: only the
            distillation, which keeps more of a detector's AP.
        distill_heads: what the distillation trains in a detector's ROI heads
            (``gn_det.distill``'s ``heads``); a backbone checkpoint's are untrained, so it is
            distilled on the backbone's outputs alone (``"none"``).
    """
    start = time.perf_counter()
    output_path, file_format = check_output(output, file_format, overwrite,
                                            standardized=spec.weight_standardization)
    if target_cfg is not None:
        check_input_conventions(source_cfg, target_cfg)
    weights, source, scope, no_statistics = _source_model(
        weights_path, _model_config(source_cfg, ENABLED=False))
    converted = convert_norm_by_spec(copy.deepcopy(source), spec)
    transfer = spec.transfer
    if transfer == "stats" and no_statistics:
        transfer += (f" (the checkpoint has no BN statistics for {len(no_statistics)} layers, "
                     f"e.g. {no_statistics[0][:-len('.running_mean')]}: for them, as copy)")
    try:
        fits, transfer = _fit(converted, source, transfer, calibration_inputs, least_squares,
                              distill_steps, "none" if scope == "backbone" else distill_heads)
    except ValueError as e:  # nothing to calibrate or distill in this model
        raise CheckpointError(f"{weights_path}: {e}") from e
    rows = [r for r in describe_norms(converted) if r.source]
    conversions = collections.Counter((r.source, r.type) for r in rows)
    groups = collections.Counter(r.groups for r in rows if r.groups)
    if target_cfg is None:
        target_cfg = _model_config(
            source_cfg, ENABLED=True, TARGET=spec.target, TRANSFER=spec.transfer,
            NUM_GROUPS=spec.num_groups, DIM_PER_GROUP=spec.dim_per_group or 0,
            EPS=spec.eps or 0.0, INCLUDE=list(spec.include), EXCLUDE=list(spec.exclude),
            WEIGHT_STANDARDIZATION=spec.weight_standardization)
    target = build_model(_model_config(target_cfg, source_cfg.MODEL.DEVICE))  # beside the source
    keys_matched, keys_expected = _write_verified(converted, target, output_path, scope,
                                                  file_format, overwrite)
    return ConversionResult(
        output=output_path,
        input_kind=weights.kind,
        scope=scope,
        conversions=dict(conversions),
        groups=dict(groups),
        transfer=transfer,
        fits=fits,
        keys_matched=keys_matched,
        keys_expected=keys_expected,
        seconds=time.perf_counter() - start,
        source_model=source,
        target_model=target,
    )

