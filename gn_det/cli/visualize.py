"""``tools/visualize.py`` (:func:`visualize_main`), over :mod:`gn_det.visualize`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from ..visualize import default_visualize_dir, visualize_predictions

__all__ = ["visualize_main"]

logger = logging.getLogger(__name__)


def _visualize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/visualize.py", description="Draw a trained "
                                     "model's predictions (masks, boxes, classes, scores) beside "
                                     "the ground truth, one PNG per image of a registered dataset.",
                                     epilog="Example: tools/visualize.py --config shapes/gn.yaml "
                                     "--weights output/demo/model_final.pth --num-images 4")
    config = parser.add_mutually_exclusive_group()
    config.add_argument("--config", metavar="NAME", default="",
                        help="a config by name in gn_det's configs/ (shapes/gn.yaml), or a path")
    config.add_argument("--config-file", metavar="FILE", default="",
                        help="a config file; default: config.yaml beside --weights "
                        "(detectron2 writes it to OUTPUT_DIR)")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="trained weights (any supported format)")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="registered dataset (default: the config's first DATASETS.TEST)")
    parser.add_argument("--num-images", type=int, default=4, metavar="N",
                        help="first N images (default 4)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where the PNGs go (default: visualize/ beside --weights)")
    parser.add_argument("--score-threshold", type=float, default=0.5, metavar="S",
                        help="draw predictions scoring at least S (default 0.5)")
    parser.add_argument("--scale", type=float, default=1.0, help="drawing scale (default 1.0)")
    parser.add_argument("--force", action="store_true", help="overwrite existing PNGs")
    parser.add_argument("--allow-unsafe-yaml", action="store_true",
                        help="accept configs that need yaml.unsafe_load (they can run code "
                        "when loaded)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides")
    return parser


def visualize_main(argv: Optional[List[str]] = None) -> int:
    """``tools/visualize.py``; returns the exit code (2 with a one-line message on bad input)."""
    parser = _visualize_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be >= 1")
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    # Deprecation chatter from detectron2's imports, not actionable by a user of the tools.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from .. import data  # noqa: F401  (registers the shapes datasets)
    from ..checkpoint import Checkpointer
    from ..checkpoint.io import CheckpointError
    from ..modeling.meta_arch import build_model
    from .config_files import load_config, resolve_config_name

    try:
        name = args.config or args.config_file
        if not name:
            name = Path(args.weights).parent / "config.yaml"
            if not name.is_file():
                raise FileNotFoundError(f"no --config given and no {name} beside the weights")
        cfg = load_config(resolve_config_name(name), allow_unsafe_yaml=args.allow_unsafe_yaml)
        cfg.merge_from_list(args.opts)
        if not torch.cuda.is_available():
            cfg.MODEL.DEVICE = "cpu"
        # Keep low-scoring boxes in the model's output too, so thresholds below its default work.
        for heads in (cfg.MODEL.ROI_HEADS, cfg.MODEL.RETINANET):
            heads.SCORE_THRESH_TEST = min(heads.SCORE_THRESH_TEST, args.score_threshold)
        dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
        if dataset is None:
            raise ValueError("the config names no DATASETS.TEST; pass --dataset")
        output_dir = Path(args.output_dir or default_visualize_dir(args.weights))
        importlib.import_module("detectron2.utils.visualizer")  # needs OpenCV: fail before any work
        model = build_model(cfg)
        # load_weights, not load: load() starts from random weights when the file is missing, and
        # reports keys that do not fit only in the log.
        incompatible = Checkpointer(model).load_weights(os.fspath(args.weights))
        problems = list(incompatible.missing_keys) + [k for k, *_ in incompatible.incorrect_shapes]
        if problems:
            raise ValueError(f"{args.weights} does not fit the config's model ({len(problems)} "
                             f"parameters missing or of another shape, e.g. {problems[0]}); is it "
                             "the config the weights were trained with?")
        paths = visualize_predictions(model, cfg, dataset, output_dir, num_images=args.num_images,
                                      score_threshold=args.score_threshold, scale=args.scale,
                                      overwrite=args.force)
    except (CheckpointError, OSError, KeyError, ValueError, AssertionError, ImportError) as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, ImportError) and e.name == "cv2":
            message = ("detectron2's Visualizer needs OpenCV, which is not installed "
                       "(pip install opencv-python-headless)")
        print(f"tools/visualize.py: error: {message}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"Wrote {path}")
    return 0
