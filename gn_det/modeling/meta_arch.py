"""``NormConverted``: the meta-architecture that makes detectron2's ``build_model`` convert.

A config that sets ``MODEL.META_ARCHITECTURE: "NormConverted"`` builds the architecture named
by ``MODEL.NORM_CONVERSION.META_ARCHITECTURE`` (``GeneralizedRCNN`` by default; any registered
one, a user's own included) and converts it as ``MODEL.NORM_CONVERSION`` says. The model
returned is that architecture's own class, with the same state-dict keys: checkpoints,
``DefaultPredictor`` and export see no wrapper.
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..config import check_config, convert_model_by_config, route_meta_architecture

__all__ = ["NormConverted", "build_model"]


@META_ARCH_REGISTRY.register()  # under its name, CONVERTING_META_ARCHITECTURE
def NormConverted(cfg: CfgNode) -> nn.Module:  # noqa: N802  (a registry name, as a class's)
    """Build ``MODEL.NORM_CONVERSION.META_ARCHITECTURE`` from ``cfg``, then convert it."""
    check_config(cfg)
    name = cfg.MODEL.NORM_CONVERSION.META_ARCHITECTURE
    return convert_model_by_config(META_ARCH_REGISTRY.get(name)(cfg), cfg)


def build_model(cfg: CfgNode) -> nn.Module:
    """detectron2's ``build_model`` on a copy of ``cfg`` routed to ``NormConverted``
    (:func:`gn_det.config.route_meta_architecture`): the model converted as
    ``MODEL.NORM_CONVERSION`` says, whatever ``MODEL.META_ARCHITECTURE`` the config names."""
    from detectron2.modeling import build_model as build_detectron2_model

    return build_detectron2_model(routed_copy(cfg))


def routed_copy(cfg: CfgNode) -> CfgNode:
    """A copy of ``cfg`` (frozen if ``cfg`` is) routed by ``route_meta_architecture``."""
    copy = cfg.clone()
    copy.defrost()
    route_meta_architecture(copy)
    if cfg.is_frozen():
        copy.freeze()
    return copy
