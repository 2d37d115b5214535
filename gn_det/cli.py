"""The ``gn-det`` command line.

    gn-det inspect --config-file CONFIG.yaml [--to GN] [--num-groups 32 | --dim-per-group N]
                   [KEY VALUE ...]

Errors (missing file, bad config key, bad option) exit with code 2 and one line on stderr; pass
``--debug`` for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional

from . import __version__
from .convert import NormSpec, convert_norm_by_spec
from .transfer import TRANSFERS

__all__ = ["main"]

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


def _build_model_from_config(config_file: str, overrides: List[str]):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    if not os.path.isfile(config_file):
        raise UsageError(f"{config_file}: no such config file")
    cfg = get_cfg()
    cfg.set_new_allowed(False)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(overrides)
    except (KeyError, ValueError, AssertionError) as e:
        raise UsageError(f"{config_file}: {e}") from e
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


def _spec_from_args(args) -> Optional[NormSpec]:
    if args.to is None:
        return None
    try:
        return NormSpec(
            target=args.to,
            num_groups=args.num_groups,
            dim_per_group=args.dim_per_group,
            transfer=args.transfer,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def _cmd_inspect(args) -> int:
    from .report import describe_norms, format_norm_table

    spec = _spec_from_args(args)
    model = _build_model_from_config(args.config_file, args.opts)
    if spec is not None:
        model = convert_norm_by_spec(model, spec)
    print(format_norm_table(describe_norms(model)))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gn-det", description="Group Normalization for detectron2 models."
    )
    parser.add_argument("--version", action="version", version=f"gn-det {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = sub.add_parser(
        "inspect",
        help="table of a model's norm layers (name, type, channels, groups) and counts per type",
        description="Build the model of a detectron2 config and list its normalisation layers; "
        "with --to, list them as conversion would leave them.",
    )
    inspect.add_argument("--config-file", required=True, metavar="FILE", help="detectron2 YAML")
    inspect.add_argument("--to", default=None, metavar="TARGET",
                         help="convert before listing: GN, FrozenBN, BN, SyncBN or naiveSyncBN")
    groups = inspect.add_mutually_exclusive_group()
    groups.add_argument("--num-groups", type=int, default=32, help="GN groups (default 32)")
    groups.add_argument("--dim-per-group", type=int, default=None,
                        help="GN channels per group, instead of --num-groups")
    inspect.add_argument("--transfer", default="stats", choices=TRANSFERS,
                         help="weight transfer for GN (default stats)")
    inspect.add_argument("--debug", action="store_true", help="show tracebacks")
    inspect.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                         help="config overrides, as in detectron2's tools")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # Deprecation chatter from detectron2's imports, not actionable by a CLI user.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"gn-det {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
