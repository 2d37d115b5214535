"""gn_det: Group Normalization for detectron2 detectors.

``convert_norm(model)`` turns every BatchNorm-family layer (BN, SyncBN, detectron2 and torchvision
FrozenBN, and any type registered in ``NORM_CONVERTERS``) into GroupNorm with weight transfer.
"""

from .convert import NormSpec, convert_norm, convert_norm_by_spec
from .groups import resolve_num_groups
from .layers import ConvertedGroupNorm
from .registry import NORM_CONVERTERS, NORM_TARGETS, NormState, TargetOptions
from .report import NormLayerInfo, count_norms, describe_norms, format_norm_table
from .transfer import TRANSFERS, transfer_bn_to_gn

__version__ = "0.1.0"

__all__ = [
    "ConvertedGroupNorm",
    "NORM_CONVERTERS",
    "NORM_TARGETS",
    "NormLayerInfo",
    "NormSpec",
    "NormState",
    "TRANSFERS",
    "TargetOptions",
    "convert_norm",
    "convert_norm_by_spec",
    "count_norms",
    "describe_norms",
    "format_norm_table",
    "resolve_num_groups",
    "transfer_bn_to_gn",
]
