"""The ``gn-det`` command line.

    gn-det train [--config NAME | --config-file FILE] [--num-gpus N ...] [KEY VALUE ...]
    gn-det convert --weights IN --output OUT [--config-file SRC.yaml] [--target-config DST.yaml]
                   [--to GN|folded] [--transfer copy|stats|calibrate|distill] [--device D]
                   [--format pth|pkl|safetensors] [--force] [--verify-images N] [--debug] ...
    gn-det inspect (--config-file X | --weights Y) [--to GN] [--device D] [KEY VALUE ...]

Bad input (missing, corrupt or unsafe file, a checkpoint that does not fit, a bad config key,
conflicting flags) exits with code 2 and one line naming the file and the problem; ``--debug``
shows the traceback. ``gn-det train`` is ``tools/train_net.py``
(:func:`gn_det.cli.train.launch_from_args`): the same flags, single- or multi-GPU, multi-node.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from typing import List, Optional

from .. import __version__
from ..distillation import HEADS
from ..transfer import TRANSFERS
from .commands import (DEFAULT_FOLD_CONFIG, DEFAULT_SOURCE_CONFIG, UsageError, cmd_convert,
                       cmd_inspect)

__all__ = ["main"]

logger = logging.getLogger(__name__)

def _add_conversion_flags(parser, convert: bool = False) -> None:
    parser.add_argument("--to", default=None, metavar="TARGET",
                        help="norm to convert to: GN (default), FrozenBN, BN, SyncBN or naiveSyncBN"
                        + ("; or folded: a GN model in its inference form, GroupNorm folded "
                           "into the convolutions (gn_det.folding)" if convert else ""))
    groups = parser.add_mutually_exclusive_group()
    groups.add_argument("--num-groups", type=int, default=None, help="GN groups (default 32)")
    groups.add_argument("--dim-per-group", type=int, default=None,
                        help="GN channels per group, instead of --num-groups")
    parser.add_argument("--transfer", default=None,
                        choices=TRANSFERS + (("calibrate", "distill") if convert else ()),
                        help="BN -> GN weight transfer (default stats: uses BN running statistics"
                        + ("; calibrate: stats, then a least-squares fit on images; distill: "
                           "stats, then feature distillation on images, what keeps most of a "
                           "detector's AP" if convert else "") + ")")
    parser.add_argument("--weight-standardization", action="store_true", default=None,
                        help="with --to GN: GN + Weight Standardization, every conv before a "
                        "GroupNorm standardising its weight (MODEL.NORM_CONVERSION."
                        "WEIGHT_STANDARDIZATION)")
    parser.add_argument("--device", default=None,
                        help="where the model runs (cpu, cuda, cuda:1); default: the config's "
                        "MODEL.DEVICE, the CPU where that is CUDA and no GPU is usable")
    parser.add_argument("--allow-unsafe-yaml", action="store_true",
                        help="load a config that needs unsafe YAML (it runs code on load); "
                        "detectron2's own model-zoo configs need no flag")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gn-det",
                                     description="Group Normalization for detectron2 models.")
    parser.add_argument("--version", action="version", version=f"gn-det {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Dispatched in main() before parsing: its flags are detectron2's (see `gn-det train --help`).
    sub.add_parser(
        "train",
        add_help=False,
        help="train or evaluate a detectron2 model (tools/train_net.py: --config gn_mask_rcnn.yaml "
        "--num-gpus 8 ...; see gn-det train --help)",
    )

    _add_convert_parser(sub)
    _add_inspect_parser(sub)
    return parser


def _add_convert_parser(sub) -> None:
    convert = sub.add_parser(
        "convert",
        help="turn a BN-trained checkpoint into a GN checkpoint, verified against the GN model",
        description="Read a checkpoint safely (detectron2 .pth, model-zoo .pkl, Detectron/Caffe2 "
        ".pkl, torchvision ResNet .pth, safetensors; detected from content), load it into the "
        "source config's model, convert its norms with weight transfer, write the result "
        "atomically and check that the target config's model loads it with nothing missing. "
        "Backbone-only (ImageNet) checkpoints become GN backbones in detectron2's "
        "ImageNet-pretrained format, usable as MODEL.WEIGHTS.",
    )
    convert.add_argument("--weights", required=True, metavar="IN", help="the checkpoint to convert")
    convert.add_argument("--output", required=True, metavar="OUT", help="where to write the result")
    convert.add_argument("--config-file", "--config", dest="config_file", default=None,
                         metavar="SRC",
                         help=f"config the weights were trained with: a path, one of gn_det's "
                         f"configs or of detectron2's model zoo (default {DEFAULT_SOURCE_CONFIG}; "
                         f"with --to folded, {DEFAULT_FOLD_CONFIG})")
    convert.add_argument("--target-config", default=None, metavar="DST",
                         help="config that must load the output (default: the source config with "
                         "conversion on); its MODEL.NORM_CONVERSION, if enabled, decides the "
                         "conversion")
    _add_conversion_flags(convert, convert=True)
    convert.add_argument("--fold-exclude", nargs="+", default=[], metavar="PREFIX",
                         help="with --to folded: module-name prefixes whose GroupNorm stays "
                         "(e.g. roi_heads); the config loads the result with FOLDED_EXCLUDE set so")
    convert.add_argument("--format", default=None, choices=("pth", "pkl", "safetensors"),
                         help="output format (default: from OUT's extension, else pth)")
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    convert.add_argument("--verify-images", type=int, default=0, metavar="N",
                         help="also compare source and converted backbones on N images")
    convert.add_argument("--verify-dataset", default=None, metavar="NAME",
                         help="registered dataset for --verify-images (default: the source "
                         "config's DATASETS.TEST, if its files are here)")
    convert.add_argument("--verify-images-dir", default=None, metavar="DIR",
                         help="a folder of JPEG/PNG images for --verify-images instead")
    convert.add_argument("--calib-images-dir", default=None, metavar="DIR",
                         help="images for --transfer calibrate or distill: any folder of JPEG/PNG "
                         "files of the model's domain (searched recursively, the first N in sorted "
                         "order, resized as the source config tests); no labels needed")
    convert.add_argument("--calib-dataset", default=None, metavar="NAME",
                         help="a registered dataset for --transfer calibrate or distill instead "
                         "(default: the source config's DATASETS.TRAIN, if its files are here)")
    convert.add_argument("--calib-images", type=int, default=None, metavar="N",
                         help="images for --transfer calibrate or distill (default 32)")
    convert.add_argument("--calib-distill-steps", type=int, default=None, metavar="K",
                         help="steps of feature distillation on those images "
                         "(gn_det.distill): after the least-squares fit with --transfer calibrate "
                         "(default 0: none), from stats with --transfer distill (default 100)")
    convert.add_argument("--calib-distill-heads", default=None, choices=HEADS,
                         help="what the distillation trains in a detector's ROI heads: weights "
                         "(default): their GN affine and all their weights, what keeps most AP; "
                         "norms: their GN affine only; none: the backbone alone. A backbone "
                         "checkpoint: always none")
    convert.add_argument("--debug", action="store_true", help="show tracebacks")
    convert.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                         help="overrides of the source config")
    convert.set_defaults(func=cmd_convert)


def _add_inspect_parser(sub) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="table of a model's or checkpoint's norm layers and counts per type",
        description="List the normalisation layers of a config's model (name, type, channels, "
        "groups; with --to, as conversion would leave them) or of a checkpoint file.",
    )
    what = inspect.add_mutually_exclusive_group(required=True)
    what.add_argument("--config-file", "--config", dest="config_file", metavar="NAME",
                      help="a config: a path, one of gn_det's configs or of detectron2's model zoo")
    what.add_argument("--weights", metavar="FILE", help="a checkpoint file (any supported format)")
    _add_conversion_flags(inspect)
    inspect.add_argument("--debug", action="store_true", help="show tracebacks")
    inspect.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                         help="config overrides, as in detectron2's tools")
    inspect.set_defaults(func=cmd_inspect)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train import launch_from_args

        launch_from_args(argv[1:], prog="gn-det train")
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "convert" and args.verify_images < 0:
        parser.error("--verify-images must be >= 0")
    if args.command == "convert":  # --fold-exclude's nargs="+" took the KEY VALUE after it too
        keys = [i for i, p in enumerate(args.fold_exclude) if re.fullmatch(r"[A-Z_]+(\.\w+)+", p)]
        args.opts = args.fold_exclude[keys[0]:] + args.opts if keys else args.opts
        args.fold_exclude = args.fold_exclude[:keys[0]] if keys else args.fold_exclude
    # Deprecation chatter from detectron2's imports, not actionable by a CLI user.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..checkpoint.io import CheckpointError
    from ..config import ConfigError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, ConfigError, OSError) as e:
        if args.debug:
            raise
        print(f"gn-det {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
