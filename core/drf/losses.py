"""The loss terms of DRF as the paper writes them: the distribution constraint (3), sample-based recovery (4) and
distribution-based recovery (5)-(7). ``DRFHead`` (core/drf/head.py) sums them into (15), (16)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.drf.distribution import QueueStats, distribution_moments

#: Cap on the exponent of (3): exp(30) ~ 1e13 keeps the loss finite in float32 for any feature.
DIS_EXPONENT_CAP = 30.0


def distribution_constraint(
    f_v: Tensor, f_t: Tensor, lam_v: Tensor, lam_t: Tensor, mu_v: Tensor, mu_t: Tensor
) -> Tensor:
    """L_dis of (3), averaged over the batch: pull each feature to its own mean, push it from the other's.

    Features and means share one space (width d: the projected one).
    """
    mu_v, mu_t = mu_v.to(f_v), mu_t.to(f_v)
    image_term = torch.linalg.vector_norm(f_v - mu_v, dim=-1) - torch.linalg.vector_norm(f_v - mu_t, dim=-1)
    text_term = torch.linalg.vector_norm(f_t - mu_t, dim=-1) - torch.linalg.vector_norm(f_t - mu_v, dim=-1)
    loss = (
        lam_v * image_term.clamp_max(DIS_EXPONENT_CAP).exp()
        + lam_t * text_term.clamp_max(DIS_EXPONENT_CAP).exp()
    )
    return loss.mean()


def sample_recovery_loss(recovered: Tensor, target: Tensor, both_present: Tensor) -> Tensor:
    """L^s of (4), averaged over the batch: lambda^v lambda^t ||C(f) - f_other||_2."""
    return (both_present * torch.linalg.vector_norm(recovered - target, dim=-1)).mean()


def distribution_recovery_loss(converter: nn.Module, source_queue: Tensor, target: QueueStats) -> Tensor:
    """L^d of (7): ||mu_{a->b} - mu_b||_2 + |sigma_{a->b} - sigma_b|, with (5), (6) over C(Q_a)."""
    mu, sigma = distribution_moments(converter(source_queue))
    return torch.linalg.vector_norm(mu - target.mean.to(mu)) + (sigma - target.sigma.to(sigma)).abs()
