"""What the norm layers of a model are (one row per layer, printable as a table), and how far a
converted model's features are from its source's (per-stage cosine on real images)."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Dict, List, Optional

import torch
from detectron2.layers import NaiveSyncBatchNorm
from tabulate import tabulate
from torch import nn

from .layers import ConvertedGroupNorm
from .registry import NORM_SOURCES

logger = logging.getLogger(__name__)

__all__ = ["NormLayerInfo", "audit_norms", "backbone_cosines", "count_norms", "describe_norms",
           "format_norm_table"]

_OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclasses.dataclass(frozen=True)
class NormLayerInfo:
    """One norm layer: where it is, what it is, and where it came from."""

    name: str
    type: str
    channels: int
    groups: Optional[int]  # GroupNorm only
    source: Optional[str]  # type it was converted from (ConvertedGroupNorm), else None
    transfer: Optional[str]  # weight transfer it applies to BN state (ConvertedGroupNorm)
    trainable: bool
    weight_standardized: bool = False  # the norm of a Weight-Standardised conv (WSConv2d)


def describe_norms(model: nn.Module) -> List[NormLayerInfo]:
    """Every normalisation layer of ``model`` (BN family, GroupNorm, LayerNorm, InstanceNorm)."""
    from .standardization import WSConv2d

    standardized = {f"{n}.norm" if n else "norm" for n, m in model.named_modules()
                    if isinstance(m, WSConv2d)}
    rows = []
    for name, module in model.named_modules():
        if NORM_SOURCES.lookup(module) is None and not isinstance(module, _OTHER_NORMS):
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        channels = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
        if channels is None:
            channels = weight.numel() if weight is not None else 0
        converted = isinstance(module, ConvertedGroupNorm)
        rows.append(NormLayerInfo(
            name=name or "(root)", type=type(module).__name__, channels=int(channels),
            groups=getattr(module, "num_groups", None),
            source=module.source if converted else None,
            transfer=module.transfer if converted else None,
            trainable=any(isinstance(p, nn.Parameter) and p.requires_grad for p in (weight, bias)),
            weight_standardized=name in standardized,
        ))
    return rows


def count_norms(model: nn.Module) -> "collections.Counter[str]":
    """Number of norm layers of each type in ``model``."""
    return collections.Counter(row.type for row in describe_norms(model))


def format_norm_table(rows: List[NormLayerInfo], *, summary: bool = True) -> str:
    """A plain-text table of ``rows`` (from :func:`describe_norms`), with per-type counts."""
    headers = ["layer", "type", "channels", "groups", "from", "transfer", "trainable"]
    table = [[r.name, r.type, r.channels, r.groups or "", r.source or "", r.transfer or "",
              r.trainable] for r in rows]
    if any(r.weight_standardized for r in rows):  # GN + WS: say which convs standardise
        headers.append("conv WS")
        for row, r in zip(table, rows):
            row.append(r.weight_standardized)
    text = tabulate(table, headers=headers, tablefmt="simple")
    if summary:
        counts = collections.Counter(r.type for r in rows)
        text += "\n\n" + tabulate(sorted(counts.items()), headers=["type", "count"])
    return text


_BATCH_STAT_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: Below this many images per normalisation batch, BN's batch statistics are noise
#: (Wu & He 2018, Fig. 1: BN's error grows sharply below 8 images per GPU).
MIN_BN_BATCH = 8


def audit_norms(model: nn.Module, images_per_gpu: int, world_size: int = 1) -> List[str]:
    """Log, and return as lines, what normalises ``model``: each norm type and count, GN groups,
    and a warning when a BatchNorm in training mode sees fewer than 8 images per batch: one
    process normalises over ``images_per_gpu`` (``IMS_PER_BATCH / world_size``), SyncBN over
    those of all ``world_size`` processes."""
    rows = describe_norms(model)
    counts = sorted(collections.Counter(r.type for r in rows).items())
    lines = ["Norm layers: " + (", ".join(f"{t} x{n}" for t, n in counts) or "none")]
    groups = collections.Counter(r.groups for r in rows if r.groups is not None)
    if groups:
        lines.append("GroupNorm groups: "
                     + ", ".join(f"{g} (x{n})" for g, n in sorted(groups.items())))
    for line in lines:
        logger.info(line)

    synced = (nn.SyncBatchNorm, NaiveSyncBatchNorm)
    batch_stat = collections.Counter(
        images_per_gpu * world_size if isinstance(m, synced) else images_per_gpu
        for m in model.modules() if isinstance(m, _BATCH_STAT_TYPES) and m.training)
    for batch, n in sorted(batch_stat.items()):
        if batch < MIN_BN_BATCH:
            warning = (f"{n} BatchNorm layers train on batch statistics of {batch} image(s) "
                       f"(< {MIN_BN_BATCH}): at this batch they are noise. GroupNorm does not "
                       "depend on the batch: set MODEL.NORM_CONVERSION.ENABLED True (TARGET GN), "
                       "or use a gn_* config.")
            logger.warning(warning)
            lines.append("WARNING: " + warning)
    return lines


@torch.no_grad()
def backbone_cosines(reference: nn.Module, other: nn.Module,
                     inputs: List[dict]) -> Dict[str, float]:
    """Mean over images of the cosine between the two models' backbone outputs, per stage; both
    models run in eval mode (BN on its running statistics), on one image at a time."""
    totals: Dict[str, float] = collections.defaultdict(float)
    modes = reference.training, other.training
    reference.eval(), other.eval()
    try:
        for item in inputs:
            ref, out = (m.backbone(m.preprocess_image([item]).tensor) for m in (reference, other))
            for stage, a in ref.items():
                totals[stage] += torch.nn.functional.cosine_similarity(
                    a.flatten().double(), out[stage].flatten().double(), dim=0).item()
    finally:
        reference.train(modes[0]), other.train(modes[1])
    return {stage: total / len(inputs) for stage, total in totals.items()}
