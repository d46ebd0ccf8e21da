"""What one forward pass of the DRF head (core/drf/head.py) produces, in the paper's names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class DRFOutput:
    """Everything one forward pass produces; losses are None without labels."""

    logits: Tensor  # [B, S], W M + b of (14)
    fused: Tensor  # [B, d], M of (12)
    image_features: Tensor  # [B, d_v], f^v in the queues' space (zeros where absent)
    text_features: Tensor  # [B, d_t], f^t
    recovered_image: Tensor  # [B, d_v], f^{t->v} = C_{t->v}(f^t)
    recovered_text: Tensor  # [B, d_t], f^{v->t} = C_{v->t}(f^v)
    log_quality_image: Tensor  # [B], log q^v (meaningless where absent)
    log_quality_text: Tensor  # [B], log q^t
    log_quality_recovered_image: Tensor  # [B], log q^{t->v} (meaningless where the text is absent)
    log_quality_recovered_text: Tensor  # [B], log q^{v->t}
    fusion_weights: Tensor  # [B, 3], the weights of (12) in EXPANSIONS order (sum 1 per post under "softmax")
    specialist_weights: Tensor | None  # [B, 2] in SPECIALISTS order (``specialist_terms``; all five sum to 1)
    image_present: Tensor  # [B] bool, lambda^v
    text_present: Tensor  # [B] bool, lambda^t
    loss: Tensor | None = None  # (16)
    loss_dis: Tensor | None = None  # (3)
    loss_rec: Tensor | None = None  # (8)
    loss_cls: Tensor | None = None  # (15)
    recovery_terms: dict[str, Tensor] = field(default_factory=dict)  # the four recovery terms of (8)
    # [3, B, S] each expanded sample classified on its own; [5, B, S] with the specialists after them
    term_logits: Tensor | None = None
    intact: Tensor | None = (
        None  # [B, 2] (image, text) undamaged rows of a training mix: queue and recovery inputs
    )

    damage_logits: Tensor | None = (
        None  # [B, 2] (image, text) log-odds that each is intact (``damage_detector``)
    )

    @property
    def probabilities(self) -> Tensor:
        """Y of (14)."""
        return self.logits.float().softmax(dim=-1)

    @property
    def term_weights(self) -> Tensor:
        """[B, 3 or 5]: every term's weight, the three of (12) then the specialists (the published order)."""
        extra = [] if self.specialist_weights is None else [self.specialist_weights]
        return torch.cat([self.fusion_weights, *extra], dim=-1)

    @property
    def abstained(self) -> Tensor:
        """Rows with no usable modality: their prediction is softmax(b) and should not be published."""
        return ~(self.image_present | self.text_present)
