"""Baselines trained exactly like DRF, on the same cached features (paper section 4.3 treatment).

* ``concat``: concatenation fusion, [W_v f^v; W_t f^t] through the same 3-layer MLP shape as DRF's F, then a linear
  classifier: DRF without queues, recovery, expansion or quality weights.
* ``text_only`` / ``image_only``: the same on one modality.

These methods cannot take a missing modality, so, as the paper does for such methods, a missing image is replaced
by the features of a blank (black) image and a missing text by those of an all-[MASK] text
(``core.train.encode_padding``).  Corrupted modalities are used as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.drf import mlp

BASELINES = ("concat", "text_only", "image_only")


@dataclass
class BaselineOutput:
    logits: Tensor  # [B, S]
    loss: Tensor | None = None  # cross-entropy, given labels


class BaselineHead(nn.Module):
    """Projections to width ``dim`` (as in DRF), a 3-layer MLP and a linear classifier; padded missing inputs."""

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
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
        if padding_image.dim() != 1 or padding_text.dim() != 1:
            raise ValueError("padding features must be vectors [D_v] and [D_t]")
        self.kind = kind
        self.labels = list(labels)
        self.dim = dim
        self.register_buffer("padding_image", padding_image.detach().float().clone())
        self.register_buffer("padding_text", padding_text.detach().float().clone())
        self.uses_image = kind in ("concat", "image_only")
        self.uses_text = kind in ("concat", "text_only")
        self.image_projection = nn.Linear(padding_image.shape[0], dim) if self.uses_image else None
        self.text_projection = nn.Linear(padding_text.shape[0], dim) if self.uses_text else None
        width = dim * (self.uses_image + self.uses_text)
        self.fusion = mlp([width, dim, dim, dim], dropout)
        self.classifier = nn.Linear(dim, len(self.labels))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "labels": self.labels, "dim": self.dim}

    def parameter_groups(self, encoder_lr: float, head_lr: float) -> list[dict[str, Any]]:
        """One group at the head learning rate (the encoders are frozen and not part of a baseline)."""
        del encoder_lr
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": head_lr}]

    def forward_features(
        self,
        image_features: Tensor,
        text_features: Tensor,
        image_present: Tensor,
        text_present: Tensor,
        labels: Tensor | None = None,
    ) -> BaselineOutput:
        parts = []
        if self.image_projection is not None:
            present = image_present.to(torch.bool)[:, None]
            parts.append(self.image_projection(torch.where(present, image_features, self.padding_image)))
        if self.text_projection is not None:
            present = text_present.to(torch.bool)[:, None]
            parts.append(self.text_projection(torch.where(present, text_features, self.padding_text)))
        logits = self.classifier(self.fusion(torch.cat(parts, dim=-1)))
        loss = F.cross_entropy(logits.float(), labels.long()) if labels is not None else None
        return BaselineOutput(logits, loss)
