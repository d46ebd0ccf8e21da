"""The DRF head (paper sections 3.2-3.5): converters, quality-weighted fusion of three expanded samples, losses.

It works on features already projected to the DRF width d; encoders and projections live in core/model.py.
Names follow the paper: f^v, f^t features, lambda^v, lambda^t presence flags, C_{v->t}, C_{t->v} converters,
F the shared fusion MLP, M the fused feature, Q_v, Q_t the feature queues.

Decisions where the paper is silent:

* Fusion weights (12) use qualities q = p / p(mu) (core/distribution.py).  Every term of (12) multiplies one
  image-distribution density by one text-distribution density, so the dropped factor 1/(2 pi sigma_v sigma_t) is
  common to all three terms: keeping it would only rescale M and tie the classifier's scale to the queues' sigma.
* A missing modality's feature is replaced by zeros (never NaN/garbage) and its terms are removed by lambda, with
  ``torch.where`` so even a NaN in an absent row cannot leak into M.
* Neither modality present: M = 0, logits = b, and the row is flagged ``abstained``.
* The exponent of (3) is capped at ``DIS_EXPONENT_CAP`` so an untrained model far from both means cannot overflow.
* Distribution-based recovery (5)-(7) runs the converter over the detached queue contents; it is skipped (0) until
  both queues hold two features (no sigma before that).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.distribution import (
    DEFAULT_QUEUE_SIZE,
    FeatureQueue,
    QueueStats,
    distribution_moments,
    stats_log_quality,
)

#: Cap on the exponent of (3): exp(30) ~ 1e13 keeps the loss finite in float32 for any feature.
DIS_EXPONENT_CAP = 30.0
#: Index of each expanded sample in ``fusion_weights`` (column order of (12)).
EXPANSIONS = ("intact", "image+recovered_text", "recovered_image+text")


@dataclass(frozen=True)
class DRFConfig:
    """Shape of the head and the ablation switches of the paper's Table 4 (all True = full DRF)."""

    num_classes: int
    dim: int = 768
    queue_size: int = DEFAULT_QUEUE_SIZE
    converter_hidden: int = 0  # 0 = dim
    fusion_hidden: int = 0  # 0 = dim
    dropout: float = 0.1
    sample_recovery: bool = True  # loss (4)
    distribution_recovery: bool = True  # losses (5)-(7)
    gaussian_weights: bool = True  # False: fusion weights are lambda only
    expansion: bool = True  # False: only the intact term, or the one term the available modality allows
    distribution_constraint: bool = True  # loss (3)

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.dim < 1 or self.queue_size < 1:
            raise ValueError(f"invalid DRF configuration: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, int | float | bool]:
        return asdict(self)


@dataclass
class DRFOutput:
    """Everything one forward pass produces; losses are None without labels."""

    logits: Tensor  # [B, S], W M + b of (14)
    fused: Tensor  # [B, d], M of (12)
    image_features: Tensor  # [B, d], f^v (zeros where absent)
    text_features: Tensor  # [B, d], f^t
    recovered_image: Tensor  # [B, d], f^{t->v} = C_{t->v}(f^t)
    recovered_text: Tensor  # [B, d], f^{v->t} = C_{v->t}(f^v)
    log_quality_image: Tensor  # [B], log q^v (meaningless where absent)
    log_quality_text: Tensor  # [B], log q^t
    fusion_weights: Tensor  # [B, 3], the lambda * q * q weights of (12) in EXPANSIONS order
    image_present: Tensor  # [B] bool, lambda^v
    text_present: Tensor  # [B] bool, lambda^t
    loss: Tensor | None = None  # (16)
    loss_dis: Tensor | None = None  # (3)
    loss_rec: Tensor | None = None  # (8)
    loss_cls: Tensor | None = None  # (15)
    loss_terms: dict[str, Tensor] = field(default_factory=dict)  # the four recovery terms of (8)

    @property
    def probabilities(self) -> Tensor:
        """Y of (14)."""
        return self.logits.float().softmax(dim=-1)

    @property
    def abstained(self) -> Tensor:
        """Rows with no usable modality: their prediction is softmax(b) and should not be published."""
        return ~(self.image_present | self.text_present)


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def distribution_constraint(
    f_v: Tensor, f_t: Tensor, lam_v: Tensor, lam_t: Tensor, stats_v: QueueStats, stats_t: QueueStats
) -> Tensor:
    """L_dis of (3), averaged over the batch: pull each feature to its own mean, push it from the other's."""
    mu_v, mu_t = stats_v.mean.to(f_v), stats_t.mean.to(f_v)
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


class DRFHead(nn.Module):
    """Converters C_{v->t}, C_{t->v} (2-layer MLPs), fusion F (3-layer MLP), classifier (14), queues Q_v, Q_t."""

    def __init__(self, config: DRFConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        conv_h = config.converter_hidden or d
        fuse_h = config.fusion_hidden or d
        self.converter_v2t = mlp([d, conv_h, d], config.dropout)
        self.converter_t2v = mlp([d, conv_h, d], config.dropout)
        self.fusion = mlp([2 * d, fuse_h, fuse_h, d], config.dropout)
        self.classifier = nn.Linear(d, config.num_classes)
        self.image_queue = FeatureQueue(d, config.queue_size)
        self.text_queue = FeatureQueue(d, config.queue_size)

    def queue_stats(self) -> dict[str, QueueStats]:
        return {"image": self.image_queue.stats(), "text": self.text_queue.stats()}

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        image_present: Tensor,
        text_present: Tensor,
        labels: Tensor | None = None,
        stats: dict[str, QueueStats] | None = None,
    ) -> DRFOutput:
        """One pass of (10)-(14), and (3)-(8), (15), (16) when ``labels`` are given (-100 = unlabelled row).

        ``stats`` overrides the queues' own statistics (the service's shared reference queues).
        """
        cfg = self.config
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(
                f"image and text features must both be [B, {cfg.dim}], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if image_features.shape[-1] != cfg.dim:
            raise ValueError(f"features have width {image_features.shape[-1]}, the head expects {cfg.dim}")
        batch = image_features.shape[0]
        present_v = image_present.to(device=image_features.device, dtype=torch.bool).reshape(batch)
        present_t = text_present.to(device=image_features.device, dtype=torch.bool).reshape(batch)
        f_v = torch.where(present_v[:, None], image_features, torch.zeros_like(image_features))
        f_t = torch.where(present_t[:, None], text_features, torch.zeros_like(text_features))
        lam_v, lam_t = present_v.float(), present_t.float()
        stats = stats or self.queue_stats()
        stats_v, stats_t = stats["image"], stats["text"]

        # Modality recovery (section 3.3) and expansion into three samples (section 3.4).
        f_v2t = self.converter_v2t(f_v)
        f_t2v = self.converter_t2v(f_t)

        # Qualities (10), (11) in log space.
        lq_v = stats_log_quality(f_v, stats_v)
        lq_t = stats_log_quality(f_t, stats_t)
        lq_t2v = stats_log_quality(f_t2v, stats_v)
        lq_v2t = stats_log_quality(f_v2t, stats_t)

        # Weights of (12): lambda^v lambda^t q^v q^t, lambda^v q^v q^{v->t}, lambda^t q^{t->v} q^t.
        if cfg.expansion:
            lams = torch.stack([lam_v * lam_t, lam_v, lam_t], dim=-1)
        else:
            lams = torch.stack([lam_v * lam_t, lam_v * (1 - lam_t), (1 - lam_v) * lam_t], dim=-1)
        if cfg.gaussian_weights:
            log_q = torch.stack([lq_v + lq_t, lq_v + lq_v2t, lq_t2v + lq_t], dim=-1)
            weights = lams * log_q.exp()
        else:
            weights = lams

        pairs = torch.cat(
            [torch.cat([f_v, f_t], -1), torch.cat([f_v, f_v2t], -1), torch.cat([f_t2v, f_t], -1)], dim=0
        )
        fused_pairs = self.fusion(pairs).reshape(3, batch, cfg.dim)
        # Where a weight is exactly zero the term is removed, not multiplied (0 * inf would be NaN).
        # (12) and (14) run in float32 even under autocast: in float16 a weight near the floor (e^-80), and so a
        # small M, would flush to zero.
        column_weights = weights.T[..., None]
        terms = torch.where(column_weights > 0, column_weights * fused_pairs.float(), 0.0)
        fused = terms.sum(dim=0)
        with torch.autocast(fused.device.type, enabled=False):
            logits = self.classifier(fused)

        out = DRFOutput(
            logits=logits,
            fused=fused,
            image_features=f_v,
            text_features=f_t,
            recovered_image=f_t2v,
            recovered_text=f_v2t,
            log_quality_image=lq_v,
            log_quality_text=lq_t,
            fusion_weights=weights,
            image_present=present_v,
            text_present=present_t,
        )
        if labels is not None:
            self._add_losses(out, labels.to(logits.device), lam_v, lam_t, stats_v, stats_t)
        return out

    def _add_losses(
        self,
        out: DRFOutput,
        labels: Tensor,
        lam_v: Tensor,
        lam_t: Tensor,
        stats_v: QueueStats,
        stats_t: QueueStats,
    ) -> None:
        """Fill in (3), (8), (15) and (16); disabled components contribute an exact zero."""
        cfg = self.config
        zero = out.logits.new_zeros((), dtype=torch.float32)
        f_v, f_t = out.image_features.float(), out.text_features.float()
        loss_dis = (
            distribution_constraint(f_v, f_t, lam_v, lam_t, stats_v, stats_t)
            if cfg.distribution_constraint
            else zero
        )
        terms = {"sample_v2t": zero, "sample_t2v": zero, "distribution_v2t": zero, "distribution_t2v": zero}
        if cfg.sample_recovery:
            both = lam_v * lam_t
            terms["sample_v2t"] = sample_recovery_loss(out.recovered_text.float(), f_t, both)
            terms["sample_t2v"] = sample_recovery_loss(out.recovered_image.float(), f_v, both)
        if cfg.distribution_recovery and len(self.image_queue) >= 2 and len(self.text_queue) >= 2:
            queue_v = self.image_queue.contents().detach()
            queue_t = self.text_queue.contents().detach()
            terms["distribution_v2t"] = distribution_recovery_loss(
                self.converter_v2t, queue_v, stats_t
            ).float()
            terms["distribution_t2v"] = distribution_recovery_loss(
                self.converter_t2v, queue_t, stats_v
            ).float()
        loss_rec = sum(terms.values(), zero)
        if bool((labels != -100).any()):
            loss_cls = F.cross_entropy(out.logits.float(), labels.long(), ignore_index=-100)
        else:
            loss_cls = zero
        out.loss_dis, out.loss_rec, out.loss_cls, out.loss_terms = loss_dis, loss_rec, loss_cls, terms
        out.loss = loss_dis + loss_rec + loss_cls

    @torch.no_grad()
    def update_queues(self, out: DRFOutput) -> tuple[Tensor, Tensor]:
        """Enqueue this batch's present features that pass rule (13); returns the accepted masks (image, text)."""
        accepted_v = self.image_queue.enqueue(out.image_features.detach().float(), out.image_present)
        accepted_t = self.text_queue.enqueue(out.text_features.detach().float(), out.text_present)
        return accepted_v, accepted_t
