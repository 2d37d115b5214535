"""gn_det: Group Normalization for detectron2 detectors.

``convert_norm(model)`` turns every BatchNorm-family layer (BN, SyncBN, detectron2 and torchvision
FrozenBN, and any type registered in ``NORM_CONVERTERS``) into GroupNorm with weight transfer.
Importing gn_det also registers its detectron2 parts: the ``MODEL.NORM_CONVERSION`` switch that
detectron2's ``build_model`` honours (``gn_det.config``) and a torchvision-ResNet FPN backbone.
"""

import warnings

with warnings.catch_warnings():
    # detectron2's first import, under torch >= 2.10 and setuptools 80, warns about its own
    # @torch.jit.script and pkg_resources use: not actionable here, and it would turn the CLI's
    # one-line errors into five lines.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    from . import data, modeling  # noqa: F401  (register the shapes datasets and the backbone)
    from .convert import NormSpec, convert_norm, convert_norm_by_spec
    from .data import load_images
    from .calibration import LayerFit, calibrate
    from .config import add_gn_det_config, convert_model_by_config, get_cfg, norm_spec_from_config
    from .distillation import DistillationResult, distill
    from .groups import resolve_num_groups
    from .layers import ConvertedGroupNorm
    from .recompute import RecomputeConv2d, disable_recompute, enable_recompute
    from .registry import NORM_CONVERTERS, NORM_TARGETS, NormState, TargetOptions
    from .report import NormLayerInfo, audit_norms, count_norms, describe_norms, format_norm_table
    from .transfer import TRANSFERS, transfer_bn_to_gn

__version__ = "0.1.0"

__all__ = [
    "ConvertedGroupNorm",
    "DistillationResult",
    "NORM_CONVERTERS",
    "LayerFit",
    "NORM_TARGETS",
    "NormLayerInfo",
    "NormSpec",
    "NormState",
    "RecomputeConv2d",
    "TRANSFERS",
    "TargetOptions",
    "add_gn_det_config",
    "calibrate",
    "audit_norms",
    "convert_model_by_config",
    "convert_norm",
    "convert_norm_by_spec",
    "count_norms",
    "describe_norms",
    "distill",
    "disable_recompute",
    "enable_recompute",
    "format_norm_table",
    "get_cfg",
    "load_images",
    "norm_spec_from_config",
    "resolve_num_groups",
    "transfer_bn_to_gn",
]
