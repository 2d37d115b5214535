"""The GroupNorm layer that conversion creates."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .checkpoint.errors import CorruptValuesError
from .groups import resolve_num_groups
from .registry import NORM_TARGETS, NormState
from .transfer import check_transfer, transfer_bn_to_gn

if TYPE_CHECKING:
    from .convert import NormSpec

__all__ = ["ChannelAffine", "ConvertedGroupNorm"]

logger = logging.getLogger(__name__)

_BN_STATE = ("running_mean", "running_var", "num_batches_tracked")


class ConvertedGroupNorm(nn.GroupNorm):
    """
    ``nn.GroupNorm`` that also loads BatchNorm-format state, transferring it on the way in.

    It computes and saves exactly what ``nn.GroupNorm`` does, so detectron2's native GN models
    load its checkpoints; a state that carries BN statistics becomes a GN affine on load (with
    ``transfer``), so every loader transfers BN-trained weights (``FrozenBatchNorm2d``'s hook).

    Args:
        num_groups, num_channels, eps, affine, device, dtype: as for ``nn.GroupNorm``.
        transfer: ``"copy"`` or ``"stats"``, applied to BN-format state on load.
        source_eps: eps of the BN layer this one replaced (BN states carry no eps).
        source: name of the replaced layer's type, for reports.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        transfer: str = "stats",
        source_eps: float = 1e-5,
        source: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.transfer = check_transfer(transfer)
        self.source_eps = source_eps
        self.source = source

    def _transferred(self, layer_name, weight, bias, running_mean, running_var,
                     input_affine=None):
        _check_values(layer_name, weight=weight, bias=bias, running_mean=running_mean,
                      running_var=running_var)
        new_weight, new_bias = transfer_bn_to_gn(
            weight, bias, running_mean, running_var, num_groups=self.num_groups,
            bn_eps=self.source_eps, gn_eps=self.eps, transfer=self.transfer,
            input_affine=input_affine)
        _check_values(layer_name, **{"transferred weight": new_weight,
                                     "transferred bias": new_bias})
        return new_weight, new_bias

    def load_bn_state(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                      layer_name: str = "GroupNorm",
                      input_affine: Optional[tuple] = None) -> None:
        """Set this layer's affine from BN tensors, using its ``transfer``; keeps requires_grad.
        ``input_affine``: what a Weight-Standardised conv before it makes of its input
        (``transfer_bn_to_gn``).
        Raises :class:`~gn_det.checkpoint.errors.CorruptValuesError` naming ``layer_name`` for
        impossible BN state (non-finite values, a negative ``running_var``), writing nothing."""
        new_weight, new_bias = self._transferred(layer_name, weight, bias, running_mean,
                                                 running_var, input_affine)
        if self.affine:
            with torch.no_grad():
                self.weight.copy_(new_weight)
                self.bias.copy_(new_bias)

    def absorb_bn_state(self, state_dict: dict, prefix: str,
                        input_affine: Optional[tuple] = None) -> None:
        """If ``state_dict`` holds BatchNorm-format state under ``prefix``, replace it, in
        place, by this layer's GN state (transferred; ``input_affine`` as for
        :meth:`load_bn_state`). Its loader calls it; so does a :class:`gn_det.WSConv2d` before
        it, with the affine of the weight being loaded, first."""
        keys = {name: prefix + name for name in ("weight", "bias") + _BN_STATE}
        if keys["running_mean"] not in state_dict and keys["running_var"] not in state_dict:
            return
        bn_state = {name: state_dict.pop(key, None) for name, key in keys.items()}
        shapes_fit = all(
            t is None or not torch.is_tensor(t) or t.numel() == self.num_channels
            for name, t in bn_state.items()
            if name != "num_batches_tracked"
        )
        if shapes_fit and self.affine:
            names = ("weight", "bias", "running_mean", "running_var")
            weight, bias = self._transferred(prefix[:-1] or "GroupNorm",
                                             *(_as_tensor(bn_state[n]) for n in names),
                                             input_affine=input_affine)
            state_dict[keys["weight"]] = weight
            state_dict[keys["bias"]] = bias
        else:
            # Hand the original tensors on, so the usual size-mismatch error names them.
            for name in ("weight", "bias"):
                if bn_state[name] is not None:
                    state_dict[keys[name]] = bn_state[name]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self.absorb_bn_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transfer={self.transfer}"


def _check_values(layer_name: str, **tensors: Optional[torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor is None or tensor.is_meta:  # a meta tensor has no values to check
            continue
        bad = ~torch.isfinite(tensor) | (tensor < 0 if name == "running_var" else False)
        if bad.any():
            raise CorruptValuesError(
                f"'{layer_name}': {int(bad.sum())} of the {tensor.numel()} values of its {name} "
                f"are {'negative or ' * (name == 'running_var')}not finite (the first: "
                f"{tensor[bad][0].item():g}); corrupt BatchNorm state, refused: a GroupNorm "
                "transferred from it would compute NaN or inf")


def _as_tensor(value) -> Optional[torch.Tensor]:
    # detectron2's checkpointer converts numpy arrays itself; plain load_state_dict may not.
    if value is None or torch.is_tensor(value):
        return value
    return torch.as_tensor(value)


@NORM_TARGETS.register("GN", produces=(nn.GroupNorm, ConvertedGroupNorm))
def _build_group_norm(state: NormState, spec: NormSpec, layer_name: str) -> nn.Module:
    groups = resolve_num_groups(state.num_features, spec.num_groups, spec.dim_per_group,
                                layer_name=layer_name)
    norm = ConvertedGroupNorm(
        groups,
        state.num_features,
        eps=state.eps if spec.eps is None else spec.eps,
        affine=state.weight is not None or state.bias is not None,
        transfer=spec.transfer,
        source_eps=state.eps,
        source=state.source,
        **state.factory_kwargs,
    )
    if not norm.affine and spec.transfer == "stats" and state.running_mean is not None:
        logger.info("'%s': affine-free BatchNorm becomes affine-free GroupNorm; its running "
                    "statistics have no GN counterpart to transfer into.", layer_name)
    norm.load_bn_state(state.weight, state.bias, state.running_mean, state.running_var,
                       layer_name, input_affine=state.input_affine)
    if norm.affine:
        norm.weight.requires_grad_(state.trainable)
        norm.bias.requires_grad_(state.trainable)
    return norm


class ChannelAffine(nn.Module):
    """``y = x * weight[c] + bias[c]`` over the channel dimension (dim 1): a norm layer with
    fixed statistics, as it is at inference. Its parameters train (for distillation); it saves
    ``weight`` and ``bias`` like the GN layer it replaced."""

    def __init__(self, num_channels: int, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, *, source: Optional[str] = None):
        super().__init__()
        self.num_channels = num_channels
        self.source = source
        self.weight = nn.Parameter(torch.ones(num_channels) if weight is None
                                   else weight.detach().clone())
        self.bias = nn.Parameter(torch.zeros(num_channels) if bias is None
                                 else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}" + (f", from {self.source}" if self.source else "")
