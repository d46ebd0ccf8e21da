"""What the fusion did on a set of posts, summarised for the training history (docs/evaluation.md's diagnosis)."""

from __future__ import annotations

import torch

from core.drf.head import EXPANSIONS, SPECIALISTS
from core.drf.output import DRFOutput


def output_diagnostics(out: DRFOutput) -> dict[str, float]:
    """What the fusion did on a set of posts: quantiles (10/50/90 %) of log q for present and recovered features,
    the mean share of each term of (12) and of each specialist term (weights over their sum per post) and the mean norm of M.

    The numbers behind docs/evaluation.md's diagnosis (stale queues, vanishing M, typicality-driven weights).
    """
    summary: dict[str, float] = {}
    both = out.image_present & out.text_present
    series = {
        "log_q_image": (out.log_quality_image, out.image_present),
        "log_q_text": (out.log_quality_text, out.text_present),
        "log_q_recovered_image": (out.log_quality_recovered_image, out.text_present),
        "log_q_recovered_text": (out.log_quality_recovered_text, out.image_present),
    }
    levels = torch.tensor([0.1, 0.5, 0.9])
    for name, (values, mask) in series.items():
        chosen = values[mask].detach().float().cpu()
        if chosen.numel():
            for level, value in zip((10, 50, 90), torch.quantile(chosen, levels).tolist(), strict=True):
                summary[f"{name}_p{level}"] = value
    weights = out.term_weights[both].detach().float().cpu()
    names = [*EXPANSIONS, *(f"{s}_alone" for s in SPECIALISTS)][: weights.shape[-1]]
    if weights.numel():
        shares = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        for name, share in zip(names, shares.mean(dim=0).tolist(), strict=True):
            summary[f"share_{name}"] = share
    summary["fused_norm"] = float(out.fused.detach().float().norm(dim=-1).mean())
    return summary
