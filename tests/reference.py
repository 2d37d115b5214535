"""Independent references for the tests: written from the formulas, not from gn_det's code."""

import numpy as np
import torch
import torch.nn.functional as F


def stats_transfer_reference(gamma, beta, mean, var, num_groups, eps):
    """The `stats` transfer of docs/design.md, group by group in numpy float64 (same eps for BN
    and GN)."""
    gamma, beta, mean, var = (np.asarray(t, dtype=np.float64) for t in (gamma, beta, mean, var))
    sigma = np.sqrt(var + eps)
    new_gamma, new_beta = np.empty_like(gamma), np.empty_like(beta)
    size = len(gamma) // num_groups
    for g in range(num_groups):
        idx = slice(g * size, (g + 1) * size)
        m_g = mean[idx].mean()
        s_g = np.sqrt(np.mean(sigma[idx] ** 2 + (mean[idx] - m_g) ** 2))
        new_gamma[idx] = gamma[idx] * s_g / sigma[idx]
        new_beta[idx] = beta[idx] - gamma[idx] * (mean[idx] - m_g) / sigma[idx]
    return torch.from_numpy(new_gamma), torch.from_numpy(new_beta)


def bn_eval(x, gamma, beta, mean, var, eps):
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)


def images_with_channel_stats(n, mean, var, spatial=(6, 6)):
    """Images whose every channel has exactly the given mean and (biased) variance."""
    c = len(mean)
    z = torch.randn(n, c, *spatial, dtype=torch.float64)
    dims = tuple(range(2, z.dim()))
    z = (z - z.mean(dim=dims, keepdim=True)) / z.std(dim=dims, keepdim=True, unbiased=False)
    shape = (1, c) + (1,) * len(spatial)
    return (mean.double().reshape(shape) + var.double().sqrt().reshape(shape) * z).float()


def random_bn_state(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        weight=torch.rand(c, generator=g) + 0.5,
        bias=torch.randn(c, generator=g),
        running_mean=torch.randn(c, generator=g) * 2,
        running_var=torch.rand(c, generator=g) * 3 + 0.1,
    )
