"""Calibration metrics and temperature scaling (core/training/calibration.py) on synthetic data with known answers,
and `postsense train` storing the temperature it fitted on dev."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from training_data import make_dataset, train_with_cli

from core.checkpoint import load_checkpoint
from core.data import load_dataset
from core.inference import Predictor
from core.training import (
    CachedSource,
    encode_samples,
    expected_calibration_error,
    feature_cache_for,
    fit_temperature,
    negative_log_likelihood,
    predict_logits,
    reliability_bins,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _sample_labels(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's distribution (so the probabilities are calibrated by construction)."""
    u = rng.random(len(probabilities))[:, None]
    return np.minimum((probabilities.cumsum(axis=1) < u).sum(axis=1), probabilities.shape[1] - 1)


def _synthetic_logits(n: int = 20000, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 1.5, size=(n, classes))
    return true_logits, _sample_labels(_softmax(true_logits), rng)


def test_ece_is_near_zero_for_calibrated_probabilities() -> None:
    true_logits, labels = _synthetic_logits()
    assert expected_calibration_error(_softmax(true_logits), labels) < 0.015


def test_ece_is_large_for_overconfident_probabilities() -> None:
    true_logits, labels = _synthetic_logits()
    overconfident = _softmax(true_logits * 4.0)
    assert expected_calibration_error(overconfident, labels) > 0.15


def test_ece_hand_computed_two_bins() -> None:
    # bin (0.5, 1]: confidences 0.9, 0.7 (mean 0.8), one right -> accuracy 0.5; |0.5 - 0.8| = 0.3, weight 1.
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7]])
    labels = np.array([0, 0])
    assert expected_calibration_error(probabilities, labels, bins=2) == pytest.approx(0.3)
    table = reliability_bins(probabilities, labels, bins=2)
    assert table == [
        {"lower": 0.0, "upper": 0.5, "count": 0.0, "confidence": 0.0, "accuracy": 0.0},
        {"lower": 0.5, "upper": 1.0, "count": 2.0, "confidence": pytest.approx(0.8), "accuracy": 0.5},
    ]


def test_reliability_bins_cover_every_sample() -> None:
    true_logits, labels = _synthetic_logits(n=500)
    table = reliability_bins(_softmax(true_logits), labels)
    assert len(table) == 15
    assert sum(b["count"] for b in table) == 500
    assert [b["lower"] for b in table] == pytest.approx([k / 15 for k in range(15)])
    for b in table:
        if b["count"]:
            assert b["lower"] <= b["confidence"] <= b["upper"]
            assert 0.0 <= b["accuracy"] <= 1.0


def test_nll_matches_hand_computation() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.5, 0.0]])
    labels = np.array([0, 1, 2])
    expected = -(math.log(0.7) + math.log(0.1) + math.log(1e-12)) / 3  # the 0 is clipped, not infinite
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(expected)


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_fit_temperature_recovers_a_known_temperature(scale: float) -> None:
    true_logits, labels = _synthetic_logits()
    temperature = fit_temperature(true_logits * scale, labels)
    assert temperature == pytest.approx(scale, rel=0.05)
    calibrated = _softmax(true_logits * scale / temperature)
    assert expected_calibration_error(calibrated, labels) < 0.02
    assert negative_log_likelihood(calibrated, labels) <= negative_log_likelihood(
        _softmax(true_logits * scale), labels
    )


def test_fit_temperature_accepts_tensors_and_handles_edge_cases() -> None:
    true_logits, labels = _synthetic_logits(n=4000)
    as_tensor = fit_temperature(torch.tensor(true_logits * 3.0, dtype=torch.float32), torch.tensor(labels))
    assert as_tensor == pytest.approx(fit_temperature(true_logits * 3.0, labels), rel=1e-4)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == 1.0
    # perfectly separated: the NLL keeps falling as T -> 0, so the fit stops at the clamp
    separated = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert fit_temperature(separated, np.array([0, 1])) == pytest.approx(0.05)
    # always wrong: the NLL falls as T grows, up to the clamp
    assert fit_temperature(separated, np.array([1, 0])) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(separated, np.array([0, 2]))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))


def test_cli_train_fits_the_temperature_on_dev_and_stores_it(tmp_path: Path, capsys) -> None:
    data_root = make_dataset(tmp_path / "data")
    # The clean regime: dev is the posts as they are (the product regime fits on its damaged dev draw instead).
    out, summary = train_with_cli(
        data_root, tmp_path, capsys, "--head-lr", "3e-3", "--regime", "clean", epochs=3
    )
    model = load_checkpoint(out).model
    temperature = model.calibration_temperature
    assert temperature is not None and 0.05 <= temperature <= 20.0 and temperature != 1.0
    assert summary["calibration_temperature"] == pytest.approx(temperature, abs=1e-4)
    # It is the NLL-optimal temperature of the saved model's logits on the dev split (not train, not test).
    dataset = load_dataset(f"jsonl:{data_root}")
    cache = feature_cache_for(model, tmp_path / "cache")
    logits, present = predict_logits(model, CachedSource(encode_samples(model, dataset["dev"], cache)))
    dev_labels = np.array([sample.label for sample in dataset["dev"]])
    assert temperature == pytest.approx(fit_temperature(logits[present], dev_labels[present]), rel=1e-4)
    assert negative_log_likelihood(_softmax(logits / temperature), dev_labels) <= negative_log_likelihood(
        _softmax(logits), dev_labels
    )
    assert Predictor.from_checkpoint(out, device="cpu").calibration == {
        "method": "temperature",
        "temperature": temperature,
    }
