"""A learned damage detector per modality, beside the Gaussian quality of (10), (11).

The Gaussian sees how far a feature lies from its queue's mean; some damage moves a feature *towards* it (typo'd
texts) or along the queue's own spread (a corrupted image), where no distance can see it.  A post shown damaged in
a training mix (``DamageMix``: the ``intact`` flags) says what damage looks like, so a small MLP per modality learns
the log-odds that a feature is intact from its standardised deviation (f - mu) / sigma, and its negative part joins
the log quality: min(0, s).  Its output layer starts at zero, so until it is trained (a clean-trained model never
is) it adds exactly nothing; its hidden layer is drawn from its own generator, so building it leaves the global
random stream, and with it every other part's initialisation and training draws, as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.drf.distribution import QueueStats

#: Width of the detector's hidden layer.
DETECTOR_HIDDEN = 64


class DamageDetector(nn.Module):
    """Features [B, d] and their queue's statistics in, the log-odds [B] that each feature is intact out."""

    def __init__(self, width: int, hidden: int = DETECTOR_HIDDEN) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(width)
        # (f - mu) / sigma has a squared norm of about 1 (2), so unit-variance weights give unit pre-activations.
        self.hidden_weight = nn.Parameter(torch.randn(width, hidden, generator=generator))
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))
        self.out_weight = nn.Parameter(torch.zeros(hidden))
        self.out_bias = nn.Parameter(torch.zeros(()))

    def forward(self, features: Tensor, stats: QueueStats) -> Tensor:
        if not stats.has_spread:
            return features.new_zeros(features.shape[0], dtype=torch.float32)
        z = (features.detach().float() - stats.mean.to(features.device)) / stats.sigma.to(features.device)
        return F.gelu(z @ self.hidden_weight + self.hidden_bias) @ self.out_weight + self.out_bias


def damage_loss(logits: Tensor, present: Tensor, intact: Tensor) -> Tensor:
    """Binary cross-entropy of the detectors' log-odds [B, 2] against the mix's ``intact`` flags [B, 2], over the
    modalities present (a discarded modality is neither intact nor damaged: it is missing).  Unweighted: the mix's
    prior (most rows are intact for any one modality) keeps the log-odds of mild damage positive, so min(0, s)
    spares it; weighting the classes equally flagged more and cost 2.5 points under corrupted text
    (docs/evaluation.md)."""
    if not bool(present.any()):
        return logits.new_zeros((), dtype=torch.float32)
    return F.binary_cross_entropy_with_logits(logits[present].float(), intact[present].float())
