"""Weight transfer from BatchNorm statistics to a GroupNorm affine: ``copy`` keeps γ, β;
``stats`` matches BN whenever an image's group statistics equal the population's (the
formulas: docs/transfer.md). Here ``S_g = sqrt(mean_{c∈g}(running_var_c + (μ_c − M_g)²) +
eps_GN)``, which is the docs' ``S_g`` when ``eps_GN == eps_BN``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["TRANSFERS", "check_transfer", "transfer_bn_to_gn"]

TRANSFERS = ("copy", "stats")


def check_transfer(transfer: str) -> str:
    """Return ``transfer`` if it names a known weight transfer, else raise ``ValueError``."""
    if transfer not in TRANSFERS:
        raise ValueError(f"Unknown transfer {transfer!r}; valid transfers: {', '.join(TRANSFERS)}")
    return transfer


@torch.no_grad()
def transfer_bn_to_gn(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                      *, num_groups: int, bn_eps: float, gn_eps: float,
                      transfer: str = "stats",
                      input_affine: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm affine (γ', β') that takes over from a BatchNorm layer: each of shape (C,), in
    the inputs' dtype and device (computed in float64, so that low-precision checkpoints do not
    lose the transfer).

    Args:
        weight, bias: BN affine γ, β, shape (C,); ``None`` means γ = 1, β = 0 (affine=False).
        running_mean, running_var: BN population statistics μ, running_var, shape (C,);
            ``None`` (a BN without running statistics) makes ``stats`` fall back to ``copy``.
        num_groups: groups G of the GroupNorm; must divide C.
        bn_eps, gn_eps: the eps of the BN source and of the GN target.
        input_affine: ``(a, c)``, each (C,) (``c`` may be None: 0), when the GN's input is
            ``a · x + c`` for the BN's input ``x``, channel by channel: a Weight-Standardised
            conv before it (``gn_det.WSConv2d``), whose output is the BN-trained conv's with
            ``a = 1/s`` (its weight's std) and ``c = b (1 − 1/s)`` for a conv bias ``b``, once
            the weight mean WS removes is set aside (docs/transfer.md). The statistics become
            ``a μ + c``, ``a² running_var`` and BN's ``σ`` ``a σ``. ``copy`` ignores it.
    """
    check_transfer(transfer)
    ref = next(t for t in (weight, bias, running_mean, running_var) if t is not None)
    channels = ref.numel()
    if channels % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} does not divide {channels} channels")
    gamma = (weight if weight is not None else torch.ones_like(ref)).double()
    beta = (bias if bias is not None else torch.zeros_like(ref)).double()
    if transfer == "copy" or running_mean is None or running_var is None:
        return gamma.to(ref), beta.to(ref)

    mean = running_mean.double().reshape(num_groups, -1)
    var = running_var.double().reshape(num_groups, -1)
    sigma = (var + bn_eps).sqrt()
    if input_affine is not None:
        a, c = (t.to(mean.device, torch.float64).reshape(num_groups, -1) if t is not None
                else 0.0 for t in input_affine)
        mean, var, sigma = a * mean + c, a * a * var, a * sigma
    group_mean = mean.mean(dim=1, keepdim=True)
    group_var = (var + (mean - group_mean) ** 2).mean(dim=1, keepdim=True)
    group_std = (group_var + gn_eps).sqrt()
    gamma_g = gamma.reshape(num_groups, -1)
    new_weight = gamma_g * group_std / sigma
    new_bias = beta.reshape(num_groups, -1) - gamma_g * (mean - group_mean) / sigma
    return new_weight.reshape(-1).to(ref), new_bias.reshape(-1).to(ref)
