"""Scores of one trained model on its test conditions: accuracy and F1, calibration, and DRF's quality AUROC.

Calibration is what the product publishes: the probabilities after temperature scaling, with the temperature
fitted on the dev split after model selection (``core.training.fit_temperature`` on the dev log-probabilities).
Per test condition: ``ece`` (top-label, 15 equal-width bins) and ``nll`` of the scaled probabilities, ``ece_raw``
and ``nll_raw`` of the unscaled ones, ``confidence`` (mean top-label probability, scaled) and ``confidence_raw``,
and the ``temperature``; the conditions named in ``reliability_tests`` also keep their reliability bins.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from core.contracts import MODALITIES
from core.model.drf_model import DRFModel, FeatureTable
from core.training import (
    CachedSource,
    classification_scores,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    predict_probabilities,
    reliability_bins,
)
from core.training.loop import Scorable

#: Equal-width bins of every ECE and reliability diagram.
ECE_BINS = 15


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probabilities, 1e-12, 1.0))


def scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities as temperature scaling publishes them."""
    logits = _log(probabilities) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def calibrated_scores(
    model: Scorable,
    dev: FeatureTable,
    tests: Mapping[str, FeatureTable],
    num_classes: int,
    reliability_tests: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """Per test condition: accuracy, weighted F1 and the calibration scores above."""
    dev_source = CachedSource(dev)
    temperature = fit_temperature(_log(predict_probabilities(model, dev_source)), dev_source.labels.numpy())
    out: dict[str, dict[str, Any]] = {}
    for name, table in tests.items():
        source = CachedSource(table)
        labels = source.labels.numpy()
        raw = predict_probabilities(model, source)
        probabilities = scaled(raw, temperature)
        scores: dict[str, Any] = classification_scores(labels, raw.argmax(-1), num_classes)
        scores.update(
            ece=expected_calibration_error(probabilities, labels, ECE_BINS),
            ece_raw=expected_calibration_error(raw, labels, ECE_BINS),
            nll=negative_log_likelihood(probabilities, labels),
            nll_raw=negative_log_likelihood(raw, labels),
            confidence=float(probabilities.max(axis=1).mean()),
            confidence_raw=float(raw.max(axis=1).mean()),
            temperature=temperature,
        )
        if name in reliability_tests:
            scores["reliability"] = reliability_bins(probabilities, labels, ECE_BINS)
        out[name] = scores
    return out


def auroc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Probability that a random ``positive`` scores above a random ``negative`` (ties count half)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs at least one score on each side")
    ranks = _ranks(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = values.argsort(kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1)
    unique, inverse = np.unique(values, return_inverse=True)
    if unique.size != values.size:
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / np.bincount(inverse))[inverse]
    return ranks


@torch.no_grad()
def damage_auroc(
    model: DRFModel, tests: Mapping[str, FeatureTable], skip: Sequence[str] = ()
) -> dict[str, float | None]:
    """For every damaged test condition ``<modality>/<kind>``: AUROC of the published quality q of that modality,
    the clean test posts (intact) against the same posts damaged, over the posts where it is present.  None when
    the damage left no such post (every image missing, as a truncated JPEG that does not decode).  The paper's
    discard setting ``D`` and the conditions in ``skip`` are left out."""
    model.train(False)

    def log_q(table: FeatureTable, modality: str) -> np.ndarray:
        out = model.forward_features(table)
        values = out.log_quality_image if modality == "image" else out.log_quality_text
        present = table.image_present if modality == "image" else table.text_present
        return values[present.to(torch.bool)].float().numpy()

    clean = {m: log_q(tests["clean"], m) for m in MODALITIES}
    result: dict[str, float | None] = {}
    for name, table in tests.items():
        modality, _, kind = name.partition("/")
        if modality not in MODALITIES or kind == "D" or name in skip:
            continue
        damaged = log_q(table, modality)
        result[name] = auroc(clean[modality], damaged) if damaged.size and clean[modality].size else None
    return result
