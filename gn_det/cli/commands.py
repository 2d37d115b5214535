"""The ``gn-det convert`` and ``gn-det inspect`` commands (parsed in :mod:`gn_det.cli`)."""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["DEFAULT_FOLD_CONFIG", "DEFAULT_SOURCE_CONFIG", "UsageError", "cmd_convert",
           "cmd_inspect"]

DEFAULT_SOURCE_CONFIG = "mask_rcnn_R_50_FPN_bn.yaml"
DEFAULT_FOLD_CONFIG = "gn_mask_rcnn.yaml"


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


def _load_cfg(name: str, overrides: List[str] = (), *, device: Optional[str] = None,
              allow_unsafe_yaml: bool = False):
    from ..config import ConfigError
    from .config_files import UnsafeConfigError, load_config, merge_overrides, resolve_config_name

    try:
        path = resolve_config_name(name)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    try:
        cfg = load_config(path, allow_unsafe_yaml=allow_unsafe_yaml)
    except (UnsafeConfigError, ConfigError) as e:
        raise UsageError(str(e)) from e
    try:
        merge_overrides(cfg, overrides)
    except ConfigError as e:
        raise UsageError(f"{path}: {e}") from e
    try:
        cfg.MODEL.DEVICE = _device(cfg, device, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _device(cfg, requested: Optional[str], overrides: List[str]) -> str:
    """``--device``, else ``MODEL.DEVICE``: refused as by ``train`` if given as CUDA with no usable
    GPU; a config file's CUDA (detectron2's default) then means the CPU."""
    import torch

    from .train import check_device

    device = requested or cfg.MODEL.DEVICE
    explicit = requested is not None or "MODEL.DEVICE" in list(overrides)[::2]
    if explicit or torch.cuda.is_available() or not device.startswith("cuda"):
        check_device(device, "--device" if requested else "MODEL.DEVICE")
        return device
    return "cpu"


def _spec(args, *, required: bool):
    from ..convert import NormSpec

    if args.to is None and not required:
        if args.weight_standardization:
            raise UsageError("--weight-standardization goes with --to GN")
        return None
    try:
        return NormSpec(
            target=args.to or "GN",
            num_groups=args.num_groups if args.num_groups is not None else 32,
            dim_per_group=args.dim_per_group,
            transfer=args.transfer or "stats",
            weight_standardization=bool(args.weight_standardization),
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def cmd_inspect(args) -> int:
    from tabulate import tabulate

    if args.weights:
        from ..checkpoint.weights import norm_layers_in, read_weights

        weights = read_weights(args.weights)
        rows = norm_layers_in(weights)
        print(f"{args.weights}: {weights.kind} checkpoint (from {weights.author}), "
              f"{len(weights.state)} tensors")
        print(tabulate(rows, headers=["layer", "norm", "channels"]))
        counts = collections.Counter(kind for _, kind, _ in rows)
        print("\n" + tabulate(sorted(counts.items()), headers=["norm", "count"]))
        return 0

    from ..modeling.meta_arch import build_model

    from ..convert import convert_norm_by_spec
    from ..report import describe_norms, format_norm_table

    spec = _spec(args, required=False)
    cfg = _load_cfg(args.config_file, args.opts, device=args.device,
                    allow_unsafe_yaml=args.allow_unsafe_yaml)
    if spec is not None:  # --to replaces the config's own conversion
        cfg.MODEL.NORM_CONVERSION.ENABLED = False
    model = build_model(cfg)
    if spec is not None:
        model = convert_norm_by_spec(model, spec)
    print(format_norm_table(describe_norms(model)))
    return 0


def _cmd_fold(args) -> int:
    """``gn-det convert --to folded``: a GN checkpoint in its inference form (gn_det.folding)."""
    from tabulate import tabulate

    from ..checkpoint.convert import check_output, fold_checkpoint

    conflicting = [f for f, v in (("--target-config", args.target_config),
                                  ("--transfer", args.transfer),
                                  ("--weight-standardization", args.weight_standardization),
                                  ("--num-groups", args.num_groups),
                                  ("--dim-per-group", args.dim_per_group),
                                  ("--calib-distill-heads", args.calib_distill_heads),
                                  ("--verify-images", args.verify_images or None)) if v is not None]
    if conflicting:
        raise UsageError(f"{', '.join(conflicting)} do not apply to --to folded")
    steps = 100 if args.calib_distill_steps is None else args.calib_distill_steps
    if steps < 0:
        raise UsageError(f"--calib-distill-steps must be 0 or more, got {steps}")
    check_output(args.output, args.format, args.force, folded=True)
    cfg = _load_cfg(args.config_file or DEFAULT_FOLD_CONFIG, args.opts, device=args.device,
                    allow_unsafe_yaml=args.allow_unsafe_yaml)
    images = None
    try:
        source = _image_source(cfg, args.calib_dataset, args.calib_images_dir, "calib",
                               "--to folded")
    except UsageError:
        print("warning: no calibration images (the source config's training set is not here, "
              "and neither --calib-images-dir nor --calib-dataset was given): folding with "
              "data-free statistics (mean 0, variance 1), which are right only for standardised "
              "inputs", file=sys.stderr)
    else:
        images = _images(cfg, source, args.calib_images if args.calib_images is not None else 32,
                         "--calib-images", "--to folded")
    result = fold_checkpoint(args.weights, args.output, cfg, images=images,
                             exclude=args.fold_exclude, distill_steps=steps,
                             file_format=args.format, overwrite=args.force)
    report = result.report
    print(f"Wrote {result.output}: the GN model folded for inference, from a {result.input_kind} "
          f"checkpoint ({result.seconds:.1f} s on {cfg.MODEL.DEVICE}, verified against "
          "MODEL.NORM_CONVERSION.FOLDED True"
          + (f" FOLDED_EXCLUDE {list(args.fold_exclude)}" if args.fold_exclude else "") + ").")
    print(tabulate(sorted(report.counts().items()), headers=["GroupNorm layers", "count"]))
    distilled = (f"; distilled {len(report.distillation.losses)} steps, loss "
                 f"{report.distillation.losses[0]:.4f} -> {report.distillation.losses[-1]:.4f}"
                 if report.distillation else "")
    print(f"statistics: {report.statistics}{distilled}    keys matched: "
          f"{result.keys_matched}/{result.keys_expected}")
    return 0


def cmd_convert(args) -> int:
    if args.to == "folded":
        return _cmd_fold(args)
    if args.fold_exclude:
        raise UsageError("--fold-exclude goes with --to folded")

    from ..checkpoint.convert import check_input_conventions, check_output, convert_checkpoint
    from ..config import norm_spec_from_config

    check_output(args.output, args.format, args.force,
                 standardized=bool(args.weight_standardization))
    source_cfg = _load_cfg(args.config_file or DEFAULT_SOURCE_CONFIG, args.opts,
                           device=args.device, allow_unsafe_yaml=args.allow_unsafe_yaml)
    target_cfg = _load_cfg(args.target_config, device=source_cfg.MODEL.DEVICE,
                           allow_unsafe_yaml=args.allow_unsafe_yaml) if args.target_config else None
    if target_cfg is not None:
        check_input_conventions(source_cfg, target_cfg)  # before minutes of calibration
    target_spec = norm_spec_from_config(target_cfg) if target_cfg is not None else None
    explicit = [f for f, v in (("--to", args.to), ("--transfer", args.transfer),
                               ("--weight-standardization", args.weight_standardization),
                               ("--num-groups", args.num_groups),
                               ("--dim-per-group", args.dim_per_group)) if v is not None]
    if target_spec is not None and explicit:
        raise UsageError(f"{', '.join(explicit)} conflict with --target-config {args.target_config}"
                         ", whose MODEL.NORM_CONVERSION decides the conversion")
    if target_cfg is not None and target_spec is None:  # a native GN target: its WS key decides
        ws = bool(target_cfg.MODEL.NORM_CONVERSION.get("WEIGHT_STANDARDIZATION", False))
        if args.weight_standardization and not ws:
            raise UsageError(f"--weight-standardization conflicts with --target-config "
                             f"{args.target_config}: its WEIGHT_STANDARDIZATION is False")
        args.weight_standardization = ws
        check_output(args.output, args.format, args.force, standardized=ws)
    method = args.transfer if args.transfer in ("calibrate", "distill") else None
    if method:
        args.transfer = "stats"  # both start from the data-free transfer
    elif any(v is not None for v in (args.calib_dataset, args.calib_images_dir, args.calib_images,
                                      args.calib_distill_steps, args.calib_distill_heads)):
        raise UsageError("--calib-dataset, --calib-images-dir, --calib-images, "
                         "--calib-distill-steps and --calib-distill-heads go with --transfer "
                         "calibrate or distill")
    steps = args.calib_distill_steps
    if steps is None:
        steps = 100 if method == "distill" else 0
    if steps < 0 or (method == "distill" and steps == 0):
        raise UsageError(f"--calib-distill-steps must be {'1' if method == 'distill' else '0'} "
                         f"or more, got {steps}")
    if args.calib_distill_heads is not None and steps == 0:
        raise UsageError("--calib-distill-heads goes with distillation: --transfer distill, or "
                         "--calib-distill-steps K > 0")
    calibrating = method is not None
    spec = target_spec or _spec(args, required=True)
    calibration_inputs = None
    if calibrating:
        source = _image_source(source_cfg, args.calib_dataset, args.calib_images_dir, "calib",
                               f"--transfer {method}")
        calibration_inputs = _images(source_cfg, source,
                                     args.calib_images if args.calib_images is not None else 32,
                                     "--calib-images", f"--transfer {method}")
    if not args.verify_images and (args.verify_dataset or args.verify_images_dir):
        raise UsageError("--verify-dataset and --verify-images-dir go with --verify-images N")
    verify_source = verify_inputs = None
    if args.verify_images:
        verify_source = _image_source(source_cfg, args.verify_dataset, args.verify_images_dir,
                                      "verify", "--verify-images")
        verify_inputs = _images(source_cfg, verify_source, args.verify_images, "--verify-images",
                                "--verify-images")

    result = convert_checkpoint(args.weights, args.output, source_cfg, spec, target_cfg=target_cfg,
                                file_format=args.format, overwrite=args.force,
                                calibration_inputs=calibration_inputs,
                                least_squares=method == "calibrate", distill_steps=steps,
                                distill_heads=args.calib_distill_heads or "weights")
    _print_conversion(result, source_cfg.MODEL.DEVICE)
    if args.verify_images:
        _print_agreement(result, verify_source, verify_inputs)
    return 0


def _print_conversion(result, device: str) -> None:
    from tabulate import tabulate

    print(f"Wrote {result.output}: {result.scope} checkpoint from a {result.input_kind} checkpoint "
          f"({result.seconds:.1f} s on {device}, verified against the target model).")
    table = [[src, dst, n] for (src, dst), n in sorted(result.conversions.items())]
    print(tabulate(table, headers=["converted from", "to", "layers"]))
    print(f"transfer: {result.transfer}    groups: "
          + (", ".join(f"{g} (x{n})" for g, n in sorted(result.groups.items())) or "-")
          + f"    keys matched: {result.keys_matched}/{result.keys_expected}"
          + (" of the backbone (a backbone checkpoint has no heads: they start as built)"
             if result.scope == "backbone" else ""))
    if result.fits:
        before = sum(f.error_before for f in result.fits) / len(result.fits)
        after = sum(f.error_after for f in result.fits) / len(result.fits)
        print(f"calibration: {len(result.fits)} layers, mean relative error per layer "
              f"{before:.4f} -> {after:.4f}")


def _image_source(cfg, dataset: Optional[str], folder: Optional[str], flag: str, purpose: str):
    """Where ``--{flag}-*`` images come from: ``--{flag}-images-dir``, ``--{flag}-dataset``, or
    the source config's own training (calib) or test (verify) set if it is available here.
    Never images of another domain by default: a COCO model is not calibrated on shapes."""
    from ..data import check_dataset_files

    if dataset and folder:
        raise UsageError(f"--{flag}-dataset and --{flag}-images-dir: give one of them")
    if folder:
        return Path(folder)
    if dataset:
        return dataset
    split = "TRAIN" if flag == "calib" else "TEST"
    names = list(cfg.DATASETS[split])
    try:
        if not names:
            raise FileNotFoundError(f"DATASETS.{split} is empty")
        check_dataset_files(names[0])
    except (FileNotFoundError, KeyError) as e:
        reason = str(e.args[0] if isinstance(e, KeyError) and e.args else e).split(". ")[0]
        raise UsageError(
            f"{purpose} needs images of the model's own domain (no labels): the source config's "
            f"DATASETS.{split} is not available here ({reason}); pass --{flag}-images-dir DIR (a "
            f"folder of your JPEG/PNG images) or --{flag}-dataset NAME"
        ) from None
    return names[0]


def _images(cfg, source, count: int, flag: str, purpose: str):
    from ..data import load_images  # importing gn_det.data registers the shapes datasets

    if count < 1:
        raise UsageError(f"{flag} must be >= 1, got {count}")
    try:
        images = load_images(cfg, source, count)
    except KeyError as e:
        raise UsageError(f"dataset {source!r} is not registered ({e})") from e
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"{purpose}: {len(images)} images of {source}" + (
        f" ({flag} {count}: no more readable there)" if len(images) < count else ""))
    return images


def _print_agreement(result, source, inputs) -> None:
    import copy

    from tabulate import tabulate

    from ..report import backbone_cosines
    from ..convert import convert_norm_by_spec

    cosines = backbone_cosines(result.source_model, result.target_model, inputs)
    columns = [cosines]
    headers = ["stage", f"cosine ({result.transfer})"]
    if result.transfer != "copy":
        from ..convert import NormSpec

        baseline = convert_norm_by_spec(copy.deepcopy(result.source_model),
                                        NormSpec(transfer="copy"))
        columns.append(backbone_cosines(result.source_model, baseline, inputs))
        headers.append("cosine (copy)")
    print(f"\nAgreement with the source model on {len(inputs)} images of {source} "
          "(cosine of backbone outputs, 1 = identical):")
    print(tabulate([[s] + [f"{c[s]:.4f}" for c in columns] for s in cosines], headers=headers))
