"""Calibration of the published probabilities: top-label ECE, NLL, reliability bins, and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T > 0 fitted on held-apart (dev) data; the
argmax, so every label, is unchanged.  numpy and torch only, so the evaluation and the trainer can both import it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Probabilities are clipped to at least this before taking the log (an exact 0 would make the NLL infinite).
PROBABILITY_FLOOR = 1e-12
#: The range fitted temperatures are clamped to (beyond it the dev set is degenerate, e.g. perfectly separated).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _checked(values: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float64 values and (N,) int64 labels in [0, C); raises ValueError otherwise."""
    array = np.asarray(values, dtype=np.float64)
    targets = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (samples, classes) array, got shape {array.shape}")
    if targets.ndim != 1 or targets.shape[0] != array.shape[0]:
        raise ValueError(
            f"labels must be a 1-D array of {array.shape[0]} class indices, got shape {targets.shape}"
        )
    if targets.size and not np.issubdtype(targets.dtype, np.integer):
        if not np.all(np.equal(np.mod(targets, 1), 0)):
            raise ValueError("labels must be integer class indices")
    targets = targets.astype(np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= array.shape[1]):
        raise ValueError(f"labels must lie in [0, {array.shape[1]}), got [{targets.min()}, {targets.max()}]")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite")
    return array, targets


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of exactly 0 goes to bin 0."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Per equal-width confidence bin: lower, upper, count, mean top-label confidence and accuracy.

    All ``bins`` bins are returned in order; an empty bin has count 0 and confidence = accuracy = 0.0 (plain
    floats, so the list serialises as strict JSON; weight or skip bins by their count).
    """
    probs, targets = _checked(probabilities, labels, "probabilities")
    index = _bin_index(probs.max(axis=1), bins) if len(probs) else np.zeros(0, dtype=np.int64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64) if len(probs) else np.zeros(0)
    counts = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    result = []
    for k in range(bins):
        n = int(counts[k])
        result.append(
            {
                "lower": k / bins,
                "upper": (k + 1) / bins,
                "count": float(n),
                "confidence": float(conf_sum[k] / n) if n else 0.0,
                "accuracy": float(correct_sum[k] / n) if n else 0.0,
            }
        )
    return result


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: the bin-size-weighted mean |accuracy - confidence| over equal-width bins; in [0, 1], 0 if empty."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(b["count"] for b in table)
    if total == 0:
        return 0.0
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / total
    return float(min(max(ece, 0.0), 1.0))


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true label), with probabilities clipped to at least PROBABILITY_FLOOR; 0.0 for an empty set."""
    probs, targets = _checked(probabilities, labels, "probabilities")
    if len(probs) == 0:
        return 0.0
    chosen = np.clip(probs[np.arange(len(probs)), targets], PROBABILITY_FLOOR, 1.0)
    return float(-np.log(chosen).mean())


def _nll_at(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(logits / temperature), computed stably (log-sum-exp)."""
    scaled = logits / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float((log_norm - scaled[np.arange(len(scaled)), targets]).mean())


def fit_temperature(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (logits, labels), clamped to [0.05, 20]; 1.0 if empty.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search over log T in the clamp range finds
    the minimum (to ~1e-6 relative) without gradients, step sizes or a starting point that could diverge.
    """
    values, targets = _checked(_as_numpy(logits), _as_numpy(labels), "logits")
    if len(values) == 0:
        return 1.0
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = _nll_at(values, targets, math.exp(a)), _nll_at(values, targets, math.exp(b))
    while hi - lo > 1e-7:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = _nll_at(values, targets, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = _nll_at(values, targets, math.exp(b))
    best = math.exp((lo + hi) / 2.0)
    # T = 1 (no change) wins ties, so a set the search cannot improve on leaves the model as it was.
    if _nll_at(values, targets, 1.0) <= _nll_at(values, targets, best):
        return 1.0
    return float(min(max(best, MIN_TEMPERATURE), MAX_TEMPERATURE))
