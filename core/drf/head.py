"""The DRF head (paper sections 3.2-3.5): converters, quality-weighted fusion of three expanded samples, and the
losses of (15), (16) (the terms of (3), (4) and (7) are in core/drf/losses.py).

It works on features already projected to the DRF width d; encoders and projections live in core/model/.
Names follow the paper: f^v, f^t features, lambda^v, lambda^t presence flags, C_{v->t}, C_{t->v} converters,
F the shared fusion MLP, M the fused feature, Q_v, Q_t the feature queues.

Decisions where the paper is silent:

* Fusion weights (12) use qualities q = p / p(mu) (core/drf/distribution.py).  Every term of (12) multiplies one
  image-distribution density by one text-distribution density, so the dropped factor 1/(2 pi sigma_v sigma_t) is
  common to all three terms: keeping it would only rescale M and tie the classifier's scale to the queues' sigma.
* A missing modality's feature is replaced by zeros (never NaN/garbage) and its terms are removed by lambda, with
  ``torch.where`` so even a NaN in an absent row cannot leak into M.
* Neither modality present: M = 0, logits = b, and the row is flagged ``abstained``.
* The exponent of (3) is capped at ``DIS_EXPONENT_CAP`` so an untrained model far from both means cannot overflow.
* Distribution-based recovery (5)-(7) runs the converter over the detached queue contents; it is skipped (0) until
  both queues hold two features (no sigma before that).

Two variants (``VARIANTS``; docs/evaluation.md has the measurements behind every departure):

* ``paper``: the equations as written: rule (13) admission, unnormalised weights lambda q q of (12), recovery targets
  of (4) that carry gradient, one classification loss on M.
* ``robust`` (the default): the paper's intent (a low-quality modality counts less, a missing one is recovered) with
  mechanisms that hold up on real posts: floor admission (queues follow the training projections); a softmax over
  the present terms' summed log qualities (weights sum to 1, M's scale no longer shrinks with typicality); detached
  targets of (4); every expanded sample classified on its own; each modality also classified alone by a specialist
  (``specialist_terms``), which get only part of the mixed prediction's gradient (``specialist_gradient``); less
  weight for the terms holding a recovered feature (``recovered_penalty``); and, trained on damaged posts, a learned
  damage detector's say in each modality's quality (``damage_detector``, core/drf/damage.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.drf.damage import DamageDetector, damage_loss
from core.drf.distribution import (
    ADMISSION_RULES,
    DEFAULT_ADMISSION_FLOOR,
    DEFAULT_QUEUE_SIZE,
    LOG_QUALITY_FLOOR,
    FeatureQueue,
    QueueStats,
    stats_log_quality,
)
from core.drf.losses import distribution_constraint, distribution_recovery_loss, sample_recovery_loss
from core.drf.output import DRFOutput

#: Index of each expanded sample in ``fusion_weights`` (column order of (12)).
EXPANSIONS = ("intact", "image+recovered_text", "recovered_image+text")
#: The specialist terms (``specialist_terms``), in ``specialist_weights`` order: one modality classified alone.
SPECIALISTS = ("image", "text")
FUSION_RULES = ("softmax", "product")
#: Mean log q of a queue's own features: -||f - mu||^2 / (2 sigma^2) averages to -1/2 because sigma^2 is the mean of
#: ||f - mu||^2 (2).
TYPICAL_LOG_QUALITY = -0.5
QUALITY_SPACES = ("encoder", "projected")


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
    # Mechanisms where the robust variant departs from the paper (VARIANTS); the defaults are the robust ones.
    admission: str = "floor"  # queue admission: "floor" or the paper's "rule13" (core/drf/distribution.py)
    admission_floor: float = DEFAULT_ADMISSION_FLOOR  # log q floor of the "floor" rule
    fusion: str = (
        "softmax"  # weights of (12): "softmax" over present terms, or the paper's "product" lambda q q
    )
    temperature: float = 1.0  # of the softmax: larger = qualities count less
    detach_targets: bool = True  # (4) pulls the converter towards a detached target
    detach_quality: bool = True  # the weights of (12) pass no gradient into the features they judge
    cap_recovered: bool = True  # a recovered feature's quality counts at most as a typical real one's
    term_loss: float = 1.0  # weight of the classification loss of each expanded sample (0 = the paper's (16))
    # Where queues, converters and qualities live: "encoder" = the encoders' own (frozen, so stationary) feature
    # spaces, projected to width d only as the fusion's input; "projected" = the paper's, after the learned
    # projections (width d, moving while they train).
    quality_space: str = "encoder"
    image_dim: int = 0  # width of the image feature space of the queues and converters (0 = dim)
    text_dim: int = 0
    normalise_image: bool = True  # L2-normalise image features first (docs/evaluation.md: quality AUROC)
    normalise_text: bool = False
    # Each modality also classified alone by an MLP on its own features: two more terms of the softmax (its log q plus
    # a typical partner's, -1/2), so a damaged modality's weight moves to the intact one's specialist.
    specialist_terms: bool = True
    # Log weight taken off each term holding a recovered feature: a converter's guess counts less than an observation
    # (with damage-trained specialists beside them the recovered pairs were the weaker terms; docs/evaluation.md).
    recovered_penalty: float = 2.0
    # Share of the mixed prediction's gradient that reaches the specialists (their own cross-entropy always does):
    # fully coupled they learn to complement the fused terms and are weaker alone, which is all a missing modality
    # leaves; uncoupled, the clean accuracy fell (docs/evaluation.md).
    specialist_gradient: float = 0.5
    # A learned detector per modality adds min(0, log-odds of intact) to its log q, trained on a damage mix's labels
    # (core/drf/damage.py; inert in a model trained clean).
    damage_detector: bool = True

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.dim < 1 or self.queue_size < 1:
            raise ValueError(f"invalid DRF configuration: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.admission not in ADMISSION_RULES:
            raise ValueError(f"admission must be one of {ADMISSION_RULES}, got {self.admission!r}")
        if self.fusion not in FUSION_RULES:
            raise ValueError(f"fusion must be one of {FUSION_RULES}, got {self.fusion!r}")
        if self.quality_space not in QUALITY_SPACES:
            raise ValueError(f"quality_space must be one of {QUALITY_SPACES}, got {self.quality_space!r}")
        if not self.temperature > 0 or min(self.term_loss, self.recovered_penalty) < 0:
            raise ValueError(f"temperature must be > 0, term_loss and recovered_penalty >= 0: {self}")
        if not 0.0 <= self.specialist_gradient <= 1.0:
            raise ValueError(f"specialist_gradient must lie in [0, 1], got {self.specialist_gradient}")

    def to_dict(self) -> dict[str, int | float | bool | str]:
        return asdict(self)

    @property
    def widths(self) -> tuple[int, int]:
        """Widths of the image and text feature spaces the head's queues and converters work in."""
        return self.image_dim or self.dim, self.text_dim or self.dim


#: Named settings of the mechanisms above.  A checkpoint written before they existed was trained as ``paper``.
VARIANTS: dict[str, dict[str, str | float | bool]] = {
    "robust": {
        "admission": "floor",
        "fusion": "softmax",
        "detach_targets": True,
        "detach_quality": True,
        "cap_recovered": True,
        "term_loss": 1.0,
        "quality_space": "encoder",
        "normalise_image": True,
        "normalise_text": False,
        "specialist_terms": True,
        "recovered_penalty": 2.0,
        "specialist_gradient": 0.5,
        "damage_detector": True,
    },
    "paper": {
        "admission": "rule13",
        "fusion": "product",
        "detach_targets": False,
        "detach_quality": False,
        "cap_recovered": False,
        "term_loss": 0.0,
        "quality_space": "projected",
        "normalise_image": False,
        "normalise_text": False,
        "specialist_terms": False,
        "recovered_penalty": 0.0,
        "specialist_gradient": 1.0,
        "damage_detector": False,
    },
}
DEFAULT_VARIANT = "robust"
#: The switches in which the variants differ.
MECHANISMS = tuple(k for k, v in VARIANTS["paper"].items() if VARIANTS["robust"][k] != v)


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class DRFHead(nn.Module):
    """Converters C_{v->t}, C_{t->v} (2-layer MLPs), fusion F (3-layer MLP), classifier (14), queues Q_v, Q_t.

    It takes features in the space its queues live in (``config.widths``); ``projections`` (the model's W_v, W_t)
    map them to the fusion width d when that is a different space (``quality_space="encoder"``).
    """

    def __init__(self, config: DRFConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        d_v, d_t = config.widths
        conv_h = config.converter_hidden or d
        fuse_h = config.fusion_hidden or d
        self.converter_v2t = mlp([d_v, conv_h, d_t], config.dropout)
        self.converter_t2v = mlp([d_t, conv_h, d_v], config.dropout)
        self.fusion = mlp([2 * d, fuse_h, fuse_h, d], config.dropout)
        self.classifier = nn.Linear(d, config.num_classes)
        self.specialists = (
            nn.ModuleList(
                mlp([width, fuse_h, fuse_h, config.num_classes], config.dropout) for width in (d_v, d_t)
            )
            if config.specialist_terms
            else None
        )
        self.image_queue = FeatureQueue(d_v, config.queue_size, config.admission, config.admission_floor)
        self.text_queue = FeatureQueue(d_t, config.queue_size, config.admission, config.admission_floor)
        self.detectors = (
            nn.ModuleList(DamageDetector(w) for w in (d_v, d_t)) if config.damage_detector else None
        )

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
        projections: tuple[nn.Module, nn.Module] | None = None,
        intact: Tensor | None = None,
    ) -> DRFOutput:
        """One pass of (10)-(14), and (3)-(8), (15), (16) when ``labels`` are given (-100 = unlabelled row).

        ``stats`` overrides the queues' own statistics (the service's shared reference queues).  ``intact`` ([B, 2]
        bool, a training mix of damaged posts) keeps damaged features out of the queues and the recovery targets.
        """
        cfg = self.config
        self._check_shapes(image_features, text_features)
        project_v, project_t = projections if projections is not None else (nn.Identity(), nn.Identity())
        batch = image_features.shape[0]
        present_v = image_present.to(device=image_features.device, dtype=torch.bool).reshape(batch)
        present_t = text_present.to(device=image_features.device, dtype=torch.bool).reshape(batch)
        f_v = torch.where(present_v[:, None], image_features, torch.zeros_like(image_features))
        f_t = torch.where(present_t[:, None], text_features, torch.zeros_like(text_features))
        stats = stats or self.queue_stats()
        stats_v, stats_t = stats["image"], stats["text"]

        # Modality recovery (section 3.3) and expansion into three samples (section 3.4).
        f_v2t = self.converter_v2t(f_v)
        f_t2v = self.converter_t2v(f_t)

        # Qualities (10), (11) in log space (unfloored for the softmax weights, which need no floor).
        floor = None if cfg.fusion == "softmax" else LOG_QUALITY_FLOOR
        lq_v = stats_log_quality(f_v, stats_v, floor)
        lq_t = stats_log_quality(f_t, stats_t, floor)
        damage = None
        if self.detectors is not None:
            damage = torch.stack(
                [d(f, s) for d, f, s in zip(self.detectors, (f_v, f_t), (stats_v, stats_t), strict=True)], -1
            )
            lq_v, lq_t = lq_v + damage[:, 0].clamp_max(0), lq_t + damage[:, 1].clamp_max(0)
        lq_t2v = stats_log_quality(f_t2v, stats_v, floor)
        lq_v2t = stats_log_quality(f_v2t, stats_t, floor)
        lams = self._term_presence(present_v.float(), present_t.float())
        weights = self._fusion_weights(lams, lq_v, lq_t, lq_t2v, lq_v2t)

        p_v, p_t, p_v2t, p_t2v = project_v(f_v), project_t(f_t), project_t(f_v2t), project_v(f_t2v)
        pairs = torch.cat(
            [torch.cat([p_v, p_t], -1), torch.cat([p_v, p_v2t], -1), torch.cat([p_t2v, p_t], -1)], dim=0
        )
        fused_pairs = self.fusion(pairs).reshape(3, batch, cfg.dim)
        # Where a weight is exactly zero the term is removed, not multiplied (0 * inf would be NaN).
        # (12) and (14) run in float32 even under autocast: in float16 a weight near the floor (e^-80), and so a
        # small M, would flush to zero.
        column_weights = weights[:, :3].T[..., None]
        terms = torch.where(column_weights > 0, column_weights * fused_pairs.float(), 0.0)
        fused = terms.sum(dim=0)
        with torch.autocast(fused.device.type, enabled=False):
            if self.specialists is None:
                logits = self.classifier(fused)
                term_logits = (
                    self.classifier(fused_pairs.float()) if labels is not None and cfg.term_loss else None
                )
            else:  # five terms, mixed as logits: (14) of M plus each specialist's own
                alone = torch.stack(
                    [head(p.float()) for head, p in zip(self.specialists, (f_v, f_t), strict=True)]
                )
                term_logits = torch.cat([self.classifier(fused_pairs.float()), alone])
                share = cfg.specialist_gradient  # the same values, a share of the gradient
                mixed = torch.cat([term_logits[:3], share * alone + (1 - share) * alone.detach()])
                all_weights = weights.T[..., None]
                logits = torch.where(all_weights > 0, all_weights * mixed, 0.0).sum(dim=0)

        out = DRFOutput(
            logits=logits,
            fused=fused,
            image_features=f_v,
            text_features=f_t,
            recovered_image=f_t2v,
            recovered_text=f_v2t,
            log_quality_image=lq_v.clamp_min(LOG_QUALITY_FLOOR),
            log_quality_text=lq_t.clamp_min(LOG_QUALITY_FLOOR),
            log_quality_recovered_image=lq_t2v.clamp_min(LOG_QUALITY_FLOOR),
            log_quality_recovered_text=lq_v2t.clamp_min(LOG_QUALITY_FLOOR),
            fusion_weights=weights[:, :3],
            specialist_weights=weights[:, 3:] if self.specialists is not None else None,
            image_present=present_v,
            text_present=present_t,
            term_logits=term_logits,
            intact=None if intact is None else intact.to(device=present_v.device, dtype=torch.bool),
            damage_logits=damage,
        )
        if labels is not None:
            # (3) needs one space for both modalities: the projected one, means mapped through the projections
            # (the mean of projected features; detached: statistics are targets, not parameters).
            with torch.no_grad():
                means = (project_v(stats_v.mean.to(p_v)[None])[0], project_t(stats_t.mean.to(p_t)[None])[0])
            self._add_losses(out, labels.to(logits.device), lams, (p_v, p_t), means, stats_v, stats_t)
        return out

    def _check_shapes(self, image_features: Tensor, text_features: Tensor) -> None:
        d_v, d_t = self.config.widths
        if (
            image_features.dim() != 2
            or text_features.dim() != 2
            or image_features.shape[0] != text_features.shape[0]
            or image_features.shape[-1] != d_v
            or text_features.shape[-1] != d_t
        ):
            raise ValueError(
                f"image and text features must be [B, {d_v}] and [B, {d_t}], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )

    def _term_presence(self, lam_v: Tensor, lam_t: Tensor) -> Tensor:
        """[B, 3]: which of the three terms of (12) exist: intact pair, image + recovered text, recovered image +
        text. With the expansion, a post with both modalities has all three; without it, only its own. [B, 5] with
        the specialist terms: each exists where its modality does."""
        if self.config.expansion:
            lams = [lam_v * lam_t, lam_v, lam_t]
        else:
            lams = [lam_v * lam_t, lam_v * (1 - lam_t), (1 - lam_v) * lam_t]
        return torch.stack(lams + ([lam_v, lam_t] if self.config.specialist_terms else []), dim=-1)

    def _fusion_weights(
        self, lams: Tensor, lq_v: Tensor, lq_t: Tensor, lq_t2v: Tensor, lq_v2t: Tensor
    ) -> Tensor:
        """[B, 3] weights of (12): lambda^v lambda^t q^v q^t, lambda^v q^v q^{v->t}, lambda^t q^{t->v} q^t (the
        paper's product rule), or a softmax of the present terms' log q over a temperature (the robust rule).
        [B, 5] with the specialist terms, whose partner counts as a typical feature: q^v e^{-1/2}, q^t e^{-1/2}.
        A recovered feature's term has ``recovered_penalty`` taken off its log weight."""
        cfg = self.config
        if cfg.cap_recovered:
            # A converter regresses towards the mean, so a recovered feature looks more typical than any real one;
            # it counts at most as a typical real feature (log q = -1/2: the mean over the queue, by (2)).
            lq_t2v, lq_v2t = lq_t2v.clamp_max(TYPICAL_LOG_QUALITY), lq_v2t.clamp_max(TYPICAL_LOG_QUALITY)
        specialists = [lq_v + TYPICAL_LOG_QUALITY, lq_t + TYPICAL_LOG_QUALITY] if cfg.specialist_terms else []
        penalty = cfg.recovered_penalty
        log_q = torch.stack(
            [lq_v + lq_t, lq_v + lq_v2t - penalty, lq_t2v + lq_t - penalty, *specialists], dim=-1
        )
        if cfg.detach_quality:
            log_q = log_q.detach()
        if not cfg.gaussian_weights:
            log_q = torch.zeros_like(log_q)
        if cfg.fusion == "softmax":
            scores = torch.where(lams > 0, log_q / cfg.temperature, float("-inf"))
            any_term = (lams > 0).any(dim=-1, keepdim=True)
            return torch.where(any_term, scores.softmax(dim=-1), 0.0)
        return lams * log_q.exp()

    def _add_losses(
        self,
        out: DRFOutput,
        labels: Tensor,
        lams: Tensor,
        projected: tuple[Tensor, Tensor],
        projected_means: tuple[Tensor, Tensor],
        stats_v: QueueStats,
        stats_t: QueueStats,
    ) -> None:
        """Fill in (3), (8), (15) and (16); disabled components contribute an exact zero."""
        cfg = self.config
        zero = out.logits.new_zeros((), dtype=torch.float32)
        lam_v, lam_t = out.image_present.float(), out.text_present.float()
        f_v, f_t = out.image_features.float(), out.text_features.float()
        loss_dis = (
            distribution_constraint(
                projected[0].float(), projected[1].float(), lam_v, lam_t, *projected_means
            )
            if cfg.distribution_constraint
            else zero
        )
        terms = {"sample_v2t": zero, "sample_t2v": zero, "distribution_v2t": zero, "distribution_t2v": zero}
        if cfg.sample_recovery:
            both = lam_v * lam_t if out.intact is None else lam_v * lam_t * out.intact.all(dim=-1).float()
            target_t, target_v = (f_t.detach(), f_v.detach()) if cfg.detach_targets else (f_t, f_v)
            terms["sample_v2t"] = sample_recovery_loss(out.recovered_text.float(), target_t, both)
            terms["sample_t2v"] = sample_recovery_loss(out.recovered_image.float(), target_v, both)
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
        labelled = labels != -100
        if bool(labelled.any()):
            loss_cls = F.cross_entropy(out.logits.float(), labels.long(), ignore_index=-100)
        else:
            loss_cls = zero
        loss_per_term = zero
        if out.term_logits is not None and bool(labelled.any()):
            # Each expanded sample that exists (lambda > 0) is a training sample of its own.
            exists = (lams.T > 0) & labelled[None, :]
            count = out.term_logits.shape[0]
            per_term = F.cross_entropy(
                out.term_logits.flatten(0, 1), labels.long().repeat(count).clamp_min(0), reduction="none"
            ).reshape(count, -1)
            loss_per_term = cfg.term_loss * (per_term * exists).sum() / exists.sum().clamp_min(1)
        out.loss_dis, out.loss_rec, out.loss_cls, out.recovery_terms = loss_dis, loss_rec, loss_cls, terms
        loss_damage = zero
        if out.damage_logits is not None and out.intact is not None:
            present = torch.stack([out.image_present, out.text_present], -1)
            loss_damage = damage_loss(out.damage_logits, present, out.intact)
        out.loss = loss_dis + loss_rec + loss_cls + loss_per_term + loss_damage

    @torch.no_grad()
    def update_queues(self, out: DRFOutput) -> tuple[Tensor, Tensor]:
        """Enqueue this batch's present (and intact) features that pass the admission rule; returns the accepted
        masks (image, text)."""
        offered_v, offered_t = out.image_present, out.text_present
        if out.intact is not None:
            offered_v, offered_t = offered_v & out.intact[:, 0], offered_t & out.intact[:, 1]
        accepted_v = self.image_queue.enqueue(out.image_features.detach().float(), offered_v)
        accepted_t = self.text_queue.enqueue(out.text_features.detach().float(), offered_t)
        return accepted_v, accepted_t
