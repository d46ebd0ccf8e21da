"""Training: it learns (beats the majority class on held-apart data), resumes exactly, caches features per
(sample, disruption), selects on dev, and the CLI writes a checkpoint the service can load.

The data is tests/training_data.py's tiny synthetic image-text set, on which the majority class scores about 50 %.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from training_data import train_with_cli

import core.training.loop as train_module
from core.checkpoint import load_checkpoint
from core.data.disruption import disrupt_dataset
from core.inference import Predictor
from core.model import create_model
from core.provenance import describe, read_training
from core.training import (
    CachedSource,
    FeatureCache,
    SampleSource,
    TrainConfig,
    TrainingError,
    classification_scores,
    encode_samples,
    ensure_demo_model,
    feature_cache_for,
    fit,
    score,
)
from core.training.features import image_key
from stream.cli import main

FAST = TrainConfig(epochs=12, batch_size=16, head_lr=3e-3, min_lr=1e-5, seed=0)


def tiny_model(labels, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("tiny", labels, dim=32, queue_size=64)


@pytest.fixture(scope="module")
def tables(dataset, tmp_path_factory: pytest.TempPathFactory):
    model = tiny_model(dataset.label_names)
    cache = feature_cache_for(model, tmp_path_factory.mktemp("cache"))
    return {split: encode_samples(model, dataset[split], cache) for split in ("train", "dev", "test")}


def test_short_training_lowers_the_loss_and_beats_the_majority_class_on_test(dataset, tables) -> None:
    model = tiny_model(dataset.label_names)
    result = fit(model, CachedSource(tables["train"]), CachedSource(tables["dev"]), FAST)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    test_labels = tables["test"].labels.numpy()
    majority = 100.0 * Counter(test_labels.tolist()).most_common(1)[0][1] / len(test_labels)
    accuracy = score(model, CachedSource(tables["test"]), 3)["accuracy"]
    assert accuracy >= majority + 15, (accuracy, majority)


def test_the_returned_model_is_the_best_dev_epoch(dataset, tables) -> None:
    model = tiny_model(dataset.label_names)
    config = TrainConfig(epochs=6, batch_size=16, head_lr=1e-2, seed=1)
    result = fit(model, CachedSource(tables["train"]), CachedSource(tables["dev"]), config)
    dev_accuracies = [h["dev_accuracy"] for h in result.history]
    assert result.best_dev_accuracy == max(dev_accuracies)
    assert result.best_epoch == 1 + dev_accuracies.index(max(dev_accuracies))
    # The weights left in the model are that epoch's, not the last epoch's.
    assert score(model, CachedSource(tables["dev"]), 3)["accuracy"] == pytest.approx(result.best_dev_accuracy)


def test_an_interrupted_run_resumed_ends_in_the_same_state(dataset, tables, tmp_path, monkeypatch) -> None:
    config = TrainConfig(epochs=4, batch_size=16, head_lr=3e-3, seed=3)
    train, dev = CachedSource(tables["train"]), CachedSource(tables["dev"])
    uninterrupted = tiny_model(dataset.label_names, seed=3)
    full = fit(uninterrupted, train, dev, config, state_path=tmp_path / "a.state")

    calls = {"n": 0}
    real_score = train_module.score

    def crash_in_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(train_module, "score", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(dataset.label_names, seed=3), train, dev, config, state_path=tmp_path / "b.state")
    monkeypatch.setattr(train_module, "score", real_score)
    # A new process: fresh model (different init), state from the file.
    resumed_model = tiny_model(dataset.label_names, seed=99)
    resumed = fit(resumed_model, train, dev, config, state_path=tmp_path / "b.state", resume=True)

    assert resumed.history == full.history
    assert resumed.best_epoch == full.best_epoch
    expected = uninterrupted.state_dict()
    for name, tensor in resumed_model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_resume_refuses_a_state_from_another_configuration(dataset, tables, tmp_path) -> None:
    train, dev = CachedSource(tables["train"]), CachedSource(tables["dev"])
    fit(
        tiny_model(dataset.label_names),
        train,
        dev,
        TrainConfig(epochs=1, batch_size=16),
        state_path=tmp_path / "s",
    )
    with pytest.raises(TrainingError, match="cannot resume"):
        fit(
            tiny_model(dataset.label_names),
            train,
            dev,
            TrainConfig(epochs=1, batch_size=32),
            state_path=tmp_path / "s",
            resume=True,
        )
    with pytest.raises(TrainingError, match="no training state"):
        fit(tiny_model(dataset.label_names), train, dev, FAST, state_path=tmp_path / "absent", resume=True)


def test_features_are_cached_per_sample_and_disruption(dataset, tmp_path) -> None:
    model = tiny_model(dataset.label_names)
    cache = feature_cache_for(model, tmp_path)
    test = dataset["test"][:12]
    clean = encode_samples(model, test, cache)
    corrupted_set, _ = disrupt_dataset(dataset, "fixed", "C", seed=5, modality="image")
    corrupted = encode_samples(model, corrupted_set["test"][:12], cache)
    # The pixel mask is applied before encoding, so corrupted images have their own features...
    assert not torch.allclose(clean.image, corrupted.image)
    assert torch.equal(clean.text, corrupted.text)
    assert len({image_key(s) for s in test} | {image_key(s) for s in corrupted_set["test"][:12]}) == 24
    # ...and a new process (fresh cache object on the same folder) finds everything: nothing left to encode.
    reopened = FeatureCache(cache.directory)
    assert reopened.missing("image", [image_key(s) for s in corrupted_set["test"][:12]]) == []
    again, _ = disrupt_dataset(dataset, "fixed", "C", seed=5, modality="image")
    assert torch.equal(encode_samples(model, again["test"][:12], reopened).image, corrupted.image)
    # Discarded modalities are absent (lambda = 0, zero rows), never encoded from a blank.
    discarded_set, _ = disrupt_dataset(dataset, "fixed", "D", seed=5, modality="text")
    discarded = encode_samples(model, discarded_set["test"][:12], reopened)
    assert not discarded.text_present.any() and discarded.image_present.all()
    assert torch.count_nonzero(discarded.text) == 0


def test_feature_cache_depends_on_encoder_weights(dataset, tmp_path) -> None:
    assert (
        feature_cache_for(tiny_model(dataset.label_names, 0), tmp_path).directory
        != feature_cache_for(tiny_model(dataset.label_names, 1), tmp_path).directory
    )


def test_classification_scores_match_a_hand_computed_example() -> None:
    # class 0: tp 2, fp 0, fn 1 -> F1 0.8 (support 3); class 1: tp 1, fp 1, fn 0 -> F1 2/3 (support 1)
    scores = classification_scores(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), 3)
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["weighted_f1"] == pytest.approx(100 * (3 * 0.8 + 2 / 3) / 4)
    with pytest.raises(ValueError):
        classification_scores(np.array([0, 1]), np.array([0]), 2)


def test_invalid_training_configuration_is_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(min_lr=1.0)


def test_cli_train_writes_a_checkpoint_the_service_loads(data_root, tmp_path, capsys) -> None:
    out, summary = train_with_cli(data_root, tmp_path, capsys, "--modality-random", "0.4")
    record = read_training(out)  # what serve, score and config say about the model
    assert record is not None and record["data"] == f"jsonl:{data_root}"
    assert record["sizes"] == {"train": 120, "dev": 40, "test": 40} and record["modality_random"]["dr"] == 0.4
    assert record["dev_accuracy"] == summary["best_dev_accuracy"]
    assert record["test_accuracy"] == summary["test"]["accuracy"]
    predictor = Predictor.from_checkpoint(out, device="cpu")
    batch = predictor.prepare([None], ["great happy day"])
    assert predictor.predict(batch).labels[0] in ("positive", "neutral", "negative")
    assert (tmp_path / "model.ckpt.state").is_file()
    # Resuming a finished run is a no-op that rewrites the same model.
    resumed, again = train_with_cli(data_root, tmp_path, capsys, "--modality-random", "0.4", "--resume")
    assert resumed == out and again["best_dev_accuracy"] == summary["best_dev_accuracy"]


def test_cli_train_in_the_product_regime_trains_on_damaged_posts_and_records_it(
    data_root, tmp_path, capsys
) -> None:
    out, summary = train_with_cli(
        data_root, tmp_path, capsys, "--regime", "product", "--product-intact", "0.6"
    )
    record = read_training(out)
    assert record is not None and record["regime"] == {"regime": "product", "intact": 0.6, "seed": 0}
    assert "product regime (intact 0.6)" in describe(record)
    # The damaged variants of the training and dev posts were encoded too: several times the clean run's features.
    clean_run = tmp_path / "clean"
    clean_checkpoint, _ = train_with_cli(data_root, clean_run, capsys, "--regime", "clean")

    # The mix's intact flags train the damage detectors (core/drf/damage.py); trained clean they stay silent.
    def detector_weight(checkpoint: Path) -> float:
        detectors = load_checkpoint(checkpoint).model.head.detectors
        assert detectors is not None
        return sum(float(d.out_weight.abs().sum()) for d in detectors)

    assert detector_weight(out) > 0 and detector_weight(clean_checkpoint) == 0

    def cached_bytes(root: Path) -> int:
        return sum(p.stat().st_size for p in (root / "cache").rglob("image-*"))

    assert cached_bytes(tmp_path) > 2 * cached_bytes(clean_run)
    assert 0 <= summary["test"]["accuracy"] <= 100
    product_finetune = ("--regime", "product", "--finetune", "text", "--finetune-objective", "drf")
    refused = train_refused(f"jsonl:{data_root}", tmp_path / "m", capsys, *product_finetune)
    assert "--regime product" in refused


def train_refused(data: str, out: Path, capsys, *extra: str) -> str:
    """``postsense train`` on the tiny encoders that must stop with a usage error (exit 2): what it said."""
    with pytest.raises(SystemExit) as done:
        main(["train", "--data", data, "--encoders", "tiny", "--out", str(out), *extra])
    assert done.value.code == 2
    return capsys.readouterr().err


def test_cli_train_reports_bad_input_without_a_traceback(tmp_path, capsys) -> None:
    assert "does not exist" in train_refused(f"jsonl:{tmp_path / 'nowhere'}", tmp_path / "m", capsys)


def test_cli_train_refuses_an_image_model_the_encoders_do_not_have(data_root, tmp_path, capsys) -> None:
    """--image-model picks an offline EfficientNet-Lite; asked of the tiny encoders it is a clear usage error."""
    refused = train_refused(f"jsonl:{data_root}", tmp_path / "m", capsys, "--image-model", "lite1")
    assert "invalid options for encoder configuration 'tiny'" in refused
    assert not (tmp_path / "m").exists()


def test_ensure_demo_model_reuses_an_existing_checkpoint(tmp_path) -> None:
    existing = tmp_path / "demo.ckpt"
    existing.write_bytes(b"already trained")
    # No data set under data_dir and no training: the checkpoint that is there is handed back untouched.
    assert ensure_demo_model(tmp_path / "no-data", existing) == existing
    assert existing.read_bytes() == b"already trained"


def test_fine_tuning_trains_the_encoders_on_raw_samples(dataset) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", dataset.label_names, dim=32, queue_size=32, freeze_encoders=False)
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    text_before = model.text_encoder.embedding.weight.clone()
    config = TrainConfig(epochs=1, batch_size=32, encoder_lr=1e-3, head_lr=1e-3)
    fit(model, SampleSource(model, dataset["train"][:64]), SampleSource(model, dataset["dev"][:16]), config)
    assert any(not torch.equal(v, before[k]) for k, v in model.image_encoder.state_dict().items())
    assert not torch.equal(model.text_encoder.embedding.weight, text_before)
