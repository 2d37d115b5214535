"""gn_det: Group Normalization for detectron2 detectors.

``convert_norm(model)`` turns every BatchNorm-family layer (BN, SyncBN, detectron2 and torchvision
FrozenBN, and any type registered in ``NORM_SOURCES``) into GroupNorm with weight transfer.
Importing gn_det registers its detectron2 parts: the ``NormConverted`` meta-architecture that
``MODEL.NORM_CONVERSION`` drives, a torchvision-ResNet FPN backbone and the shapes datasets.
"""

import warnings

with warnings.catch_warnings():
    # detectron2's first import, under torch >= 2.10 and setuptools 80, warns about its own
    # @torch.jit.script and pkg_resources use: not actionable here, and it would turn the CLI's
    # one-line errors into five lines.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    from . import layers  # noqa: F401  (registers the GN target first: NORM_TARGETS lists it first)
    from . import batch_norm, data, modeling  # noqa: F401  (register BN norms, datasets, detectron2 parts)
    from .calibration import LayerFit, calibrate
    from .config import add_gn_det_config, convert_model_by_config, get_cfg, norm_spec_from_config
    from .config import route_meta_architecture
    from .convert import NormSpec, convert_norm, convert_norm_by_spec
    from .data import load_images
    from .distillation import DistillationResult, distill
    from .groups import resolve_num_groups
    from .layers import ConvertedGroupNorm
    from .modeling import NormConverted, build_model
    from .recompute import RecomputeConv2d, disable_recompute, enable_recompute
    from .registry import NORM_SOURCES, NORM_TARGETS, NormState
    from .standardization import WSConv2d, standardize_weight, standardize_weights
    from .report import NormLayerInfo, audit_norms, count_norms, describe_norms, format_norm_table
    from .transfer import TRANSFERS, transfer_bn_to_gn

__version__ = "0.2.0"

__all__ = [
    "NORM_SOURCES",
    "NORM_TARGETS",
    "ConvertedGroupNorm",
    "DistillationResult",
    "LayerFit",
    "NormConverted",
    "NormLayerInfo",
    "NormSpec",
    "NormState",
    "RecomputeConv2d",
    "TRANSFERS",
    "WSConv2d",
    "add_gn_det_config",
    "audit_norms",
    "build_model",
    "calibrate",
    "convert_model_by_config",
    "convert_norm",
    "convert_norm_by_spec",
    "count_norms",
    "describe_norms",
    "disable_recompute",
    "distill",
    "enable_recompute",
    "format_norm_table",
    "get_cfg",
    "load_images",
    "norm_spec_from_config",
    "resolve_num_groups",
    "route_meta_architecture",
    "standardize_weight",
    "standardize_weights",
    "transfer_bn_to_gn",
]


def __getattr__(name: str):
    if name in ("NORM_CONVERTERS", "TargetOptions"):
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
