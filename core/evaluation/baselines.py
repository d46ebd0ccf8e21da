"""Baselines trained exactly like DRF, on the same cached features (paper section 4.3 treatment).

* ``concat``: concatenation fusion, [W_v f^v; W_t f^t] through the same 3-layer MLP shape as DRF's F, then a linear
  classifier: DRF without queues, recovery, expansion or quality weights.
* ``text_only`` / ``image_only``: the same on one modality.
* ``concat_dropout``: ``concat`` trained with modality dropout: each training sample, with probability 0.5, has one
  modality (either, equally likely) replaced by its padding, so the head learns to score posts missing one.
* ``router`` (``Router``): what a practitioner would deploy without DRF: each post goes to the model of the
  modalities it has (``concat`` when both are present, else ``text_only`` or ``image_only``).  It is composed of
  the three trained heads, so it costs no training of its own.
* ``gated_router`` (``GatedRouter``): the router made quality-aware with DRF's own published quality q (the DRF
  model trained on the same fold and seed): when one modality's log q falls below its threshold, the post goes to
  the specialist of the other, intact modality; otherwise as the router (concat when both are present).  The two
  thresholds are picked on dev (``choose_gates``): the pair, among quantiles of the dev posts' log q, that scores
  best on the clean dev posts together with the same posts with the image, and with the text, corrupted by the
  paper's protocol (C).  No test damage kind is used to pick them.  It costs no training of its own either.

These methods cannot take a missing modality, so, as the paper does for such methods, a missing image is replaced
by the features of a blank (black) image and a missing text by those of an all-[MASK] text
(``core.training.features.encode_padding``).  Corrupted modalities are used as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.drf.head import mlp
from core.model.drf_model import DRFModel, FeatureTable

HEADS = ("concat", "concat_dropout", "text_only", "image_only")
BASELINES = (*HEADS, "router", "gated_router")
#: Quantiles of dev log q tried as gate thresholds (and "never gate").
GATE_QUANTILES = tuple(q / 100 for q in range(0, 101, 5))
#: Probability that a training sample of ``concat_dropout`` loses one modality.
MODALITY_DROPOUT = 0.5


@dataclass
class BaselineOutput:
    logits: Tensor  # [B, S]
    loss: Tensor | None = None  # cross-entropy, given labels


class BaselineHead(nn.Module):
    """Projections to width ``dim`` (as in DRF), a 3-layer MLP and a linear classifier; padded missing inputs."""

    padding_image: Tensor
    padding_text: Tensor

    def __init__(
        self,
        kind: str,
        labels: Sequence[str],
        padding_image: Tensor,
        padding_text: Tensor,
        dim: int = 768,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown baseline head {kind!r}; choose one of {', '.join(HEADS)}")
        if padding_image.dim() != 1 or padding_text.dim() != 1:
            raise ValueError("padding features must be vectors [D_v] and [D_t]")
        self.kind = kind
        self.labels = list(labels)
        self.register_buffer("padding_image", padding_image.detach().float().clone())
        self.register_buffer("padding_text", padding_text.detach().float().clone())
        self.uses_image = kind != "text_only"
        self.uses_text = kind != "image_only"
        self.modality_dropout = MODALITY_DROPOUT if kind == "concat_dropout" else 0.0
        self.image_projection = nn.Linear(padding_image.shape[0], dim) if self.uses_image else None
        self.text_projection = nn.Linear(padding_text.shape[0], dim) if self.uses_text else None
        width = dim * (self.uses_image + self.uses_text)
        self.fusion = mlp([width, dim, dim, dim], dropout)
        self.classifier = nn.Linear(dim, len(self.labels))

    def parameter_groups(self, encoder_lr: float, head_lr: float) -> list[dict[str, Any]]:
        """One group at the head learning rate (the encoders are frozen and not part of a baseline)."""
        del encoder_lr
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": head_lr}]

    def forward_features(self, features: FeatureTable, labels: Tensor | None = None) -> BaselineOutput:
        parts = []
        image_present, text_present = features.image_present, features.text_present
        if self.training and self.modality_dropout:
            image_present, text_present = _drop_one_modality(
                image_present, text_present, self.modality_dropout
            )
        if self.image_projection is not None:
            present = image_present.to(torch.bool)[:, None]
            parts.append(self.image_projection(torch.where(present, features.image, self.padding_image)))
        if self.text_projection is not None:
            present = text_present.to(torch.bool)[:, None]
            parts.append(self.text_projection(torch.where(present, features.text, self.padding_text)))
        logits = self.classifier(self.fusion(torch.cat(parts, dim=-1)))
        loss = F.cross_entropy(logits.float(), labels.long()) if labels is not None else None
        return BaselineOutput(logits, loss)


def _drop_one_modality(image_present: Tensor, text_present: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """Presence flags with one modality removed from a ``rate`` share of the rows that have both."""
    image_present, text_present = image_present.to(torch.bool), text_present.to(torch.bool)
    drop = (
        (torch.rand(image_present.shape, device=image_present.device) < rate) & image_present & text_present
    )
    drop_image = drop & (torch.rand(image_present.shape, device=image_present.device) < 0.5)
    return image_present & ~drop_image, text_present & ~(drop & ~drop_image)


class Router(nn.Module):
    """Routes each post to the trained head of the modalities it has: concat (both), text_only or image_only."""

    def __init__(self, concat: BaselineHead, text_only: BaselineHead, image_only: BaselineHead) -> None:
        super().__init__()
        if (concat.kind, text_only.kind, image_only.kind) != ("concat", "text_only", "image_only"):
            raise ValueError("a router needs the concat, text_only and image_only heads, in that order")
        self.concat, self.text_only, self.image_only = concat, text_only, image_only
        self.labels = concat.labels

    def forward_features(self, features: FeatureTable, labels: Tensor | None = None) -> BaselineOutput:
        if labels is not None:
            raise ValueError("a router is composed of trained heads; train those instead")
        image_present, text_present = (
            features.image_present.to(torch.bool),
            features.text_present.to(torch.bool),
        )
        logits = self.concat.forward_features(features).logits
        only_text = (text_present & ~image_present)[:, None]
        only_image = (image_present & ~text_present)[:, None]
        logits = torch.where(only_text, self.text_only.forward_features(features).logits, logits)
        logits = torch.where(only_image, self.image_only.forward_features(features).logits, logits)
        return BaselineOutput(logits)


class GatedRouter(nn.Module):
    """The router, but a post whose image (text) has log q below ``gate_image`` (``gate_text``) under the DRF model
    goes to the text-only (image-only) head; when both fall below their gates, concat."""

    def __init__(
        self,
        drf: DRFModel,
        router: Router,
        gate_image: float = float("-inf"),
        gate_text: float = float("-inf"),
    ) -> None:
        super().__init__()
        self.drf, self.router = drf, router
        self.labels = router.labels
        self.gate_image, self.gate_text = gate_image, gate_text

    @torch.no_grad()
    def parts(self, features: FeatureTable) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """log q of image and text (-inf where absent), and the router's, text-only and image-only logits."""
        out = self.drf.forward_features(features)
        image_present = features.image_present.to(torch.bool)
        text_present = features.text_present.to(torch.bool)
        log_q_image = torch.where(image_present, out.log_quality_image.float(), float("-inf"))
        log_q_text = torch.where(text_present, out.log_quality_text.float(), float("-inf"))
        return (
            log_q_image,
            log_q_text,
            self.router.forward_features(features).logits,
            self.router.text_only.forward_features(features).logits,
            self.router.image_only.forward_features(features).logits,
        )

    def forward_features(self, features: FeatureTable, labels: Tensor | None = None) -> BaselineOutput:
        if labels is not None:
            raise ValueError("a gated router is composed of trained models; train those instead")
        log_q_image, log_q_text, routed, text_only, image_only = self.parts(features)
        return BaselineOutput(
            _gate(log_q_image, log_q_text, routed, text_only, image_only, self.gate_image, self.gate_text)
        )


def _gate(
    log_q_image: Tensor,
    log_q_text: Tensor,
    routed: Tensor,
    text_only: Tensor,
    image_only: Tensor,
    gate_image: float,
    gate_text: float,
) -> Tensor:
    """Routed logits, with the text specialist where only the image is below its gate and the image specialist
    where only the text is (an absent modality, log q = -inf, is the router's business: left as routed)."""
    image_present, text_present = log_q_image > float("-inf"), log_q_text > float("-inf")
    image_low = image_present & text_present & (log_q_image < gate_image)
    text_low = image_present & text_present & (log_q_text < gate_text)
    logits = torch.where((image_low & ~text_low)[:, None], text_only, routed)
    return torch.where((text_low & ~image_low)[:, None], image_only, logits)


def choose_gates(model: GatedRouter, dev_tables: Sequence[FeatureTable]) -> tuple[float, float]:
    """The (image, text) gates, among quantiles of the dev tables' log q (and -inf, never gate), with the best
    accuracy over all ``dev_tables`` together; ties go to the lower gates (gate less)."""
    parts = [model.parts(table) for table in dev_tables]
    labels = torch.cat([t.labels for t in dev_tables if t.labels is not None])
    if len(labels) != sum(len(t) for t in dev_tables):
        raise ValueError("choosing gates needs labelled dev tables")
    columns = [torch.cat([p[i] for p in parts]) for i in range(5)]

    def candidates(log_q: Tensor) -> list[float]:
        present = log_q[log_q > float("-inf")].double().numpy()
        if present.size == 0:
            return [float("-inf")]
        return [float("-inf"), *sorted(set(np.quantile(present, GATE_QUANTILES).tolist()))]

    best = (-1.0, float("-inf"), float("-inf"))
    for gate_image in candidates(columns[0]):
        for gate_text in candidates(columns[1]):
            logits = _gate(columns[0], columns[1], columns[2], columns[3], columns[4], gate_image, gate_text)
            predicted = logits.argmax(-1)
            accuracy = float((predicted == labels).double().mean())
            if accuracy > best[0]:
                best = (accuracy, gate_image, gate_text)
    return best[1], best[2]
