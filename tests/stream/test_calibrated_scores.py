"""Temperature scaling in the product: a checkpoint's temperature changes the published probabilities exactly as
softmax(logits / T) says and never a label; a checkpoint without one (written before calibration existed) loads and
publishes as before, with ``"calibration": null``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from images import png_base64
from stream_support import LABELS

from core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core.contracts import validator
from core.inference import Predictor
from core.model import DRFModel, create_model


def decisive_tiny_model() -> DRFModel:
    """The seeded tiny model with its classifier scaled up, so probabilities are far from uniform and a temperature
    moves them visibly (an untrained tiny model is within 0.07 of uniform)."""
    torch.manual_seed(0)
    model = create_model("tiny", labels=LABELS)
    with torch.no_grad():
        model.head.classifier.weight.mul_(40.0)
        model.head.classifier.bias.mul_(40.0)
    return model


def softmax_at(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): the logits are log p up to a per-row constant."""
    scaled = np.log(probabilities) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    return np.exp(scaled) / np.exp(scaled).sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One model's weights saved three ways: without a temperature (the old layout), with T = 1 and with T = 2.5."""
    directory = tmp_path_factory.mktemp("calibrated")
    model = decisive_tiny_model()
    paths = {}
    for name, temperature in (("old", None), ("t1", 1.0), ("t2.5", 2.5)):
        model.calibration_temperature = temperature
        paths[name] = directory / f"{name}.ckpt"
        save_checkpoint(model, paths[name], model_version=f"tiny-{name}")
    return paths


def posts_file(path: Path) -> Path:
    lines = [
        {"id": f"t{i}", "text": text} for i, text in enumerate(["what a lovely day", "grey and rainy", "meh"])
    ]
    lines += [
        {"id": "img", "text": "sunny", "image": {"base64": png_base64()}},
        {"id": "img-only", "image": {"base64": png_base64()}},
        {"id": "nothing"},  # abstained: no probabilities to calibrate
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def postsense_score(checkpoint: Path, posts: Path, out: Path) -> dict[str, dict]:
    """``postsense score`` as a user runs it; the records by post id (each checked against the contract)."""
    command = [sys.executable, "-m", "stream", "--checkpoint", str(checkpoint), "--device", "cpu"]
    done = subprocess.run(
        [*command, "score", str(posts), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record in records:
        assert not list(validator("sentiment").iter_errors(record)), record
    return {record["id"]: record for record in records}


def probability_rows(records: dict[str, dict], ids: list[str]) -> np.ndarray:
    return np.array([[records[i]["probabilities"][label] for label in LABELS] for i in ids])


def test_score_publishes_softmax_of_logits_over_the_checkpoints_temperature(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    posts = posts_file(tmp_path / "posts.jsonl")
    plain = postsense_score(checkpoints["t1"], posts, tmp_path / "t1.jsonl")
    scaled = postsense_score(checkpoints["t2.5"], posts, tmp_path / "t2.5.jsonl")
    assert set(plain) == set(scaled) == {"t0", "t1", "t2", "img", "img-only", "nothing"}
    scored = [i for i in plain if i != "nothing"]
    p1, p25 = probability_rows(plain, scored), probability_rows(scaled, scored)
    assert np.abs(p1 - p25).max() > 0.05, "the temperature must move the published probabilities"
    np.testing.assert_allclose(p25, softmax_at(p1, 2.5), atol=2e-5)
    assert p25.max(axis=1).max() < p1.max(axis=1).max()  # T > 1 softens
    assert [plain[i]["label"] for i in plain] == [scaled[i]["label"] for i in plain]
    assert scaled["t0"]["calibration"] == {"method": "temperature", "temperature": 2.5}
    assert plain["t0"]["calibration"] == {"method": "temperature", "temperature": 1.0}
    assert scaled["nothing"]["abstained"] and scaled["nothing"]["probabilities"] is None


def test_a_checkpoint_without_a_temperature_loads_and_publishes_as_before(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    assert load_checkpoint(checkpoints["old"]).model.calibration_temperature is None
    posts = posts_file(tmp_path / "posts.jsonl")
    old = postsense_score(checkpoints["old"], posts, tmp_path / "old.jsonl")
    plain = postsense_score(checkpoints["t1"], posts, tmp_path / "t1.jsonl")
    assert all(record["calibration"] is None for record in old.values())
    for post_id, record in old.items():  # T = 1 divides by one: the very same numbers
        assert record["probabilities"] == plain[post_id]["probabilities"]
        assert record["label"] == plain[post_id]["label"]
    # ... and the numbers of the model itself, before any checkpoint: the plain softmax of its logits.
    model = decisive_tiny_model()
    predictor = Predictor.from_model(model)
    texts = ["what a lovely day", "grey and rainy", "meh"]
    batch = predictor.prepare([None] * 3, texts)
    with torch.no_grad():
        expected = model(batch).logits.float().softmax(-1).numpy()
    np.testing.assert_array_equal(predictor.predict(batch).probabilities, expected)
    # (score batched them with the image posts: other padding, so equal to float32 rounding, not bit for bit)
    np.testing.assert_allclose(probability_rows(old, ["t0", "t1", "t2"]), expected, atol=1e-6)


def test_predictor_divides_the_logits_by_the_temperature_and_keeps_every_label() -> None:
    model = decisive_tiny_model()
    predictor = Predictor.from_model(model)
    batch = predictor.prepare([None] * 4, ["great", "awful day", "the bus again", "so so"])
    with torch.no_grad():
        logits = model(batch).logits.float()
    before = predictor.predict(batch)
    assert predictor.calibration is None
    for temperature in (0.3, 2.5, 20.0):
        predictor.calibration_temperature = temperature
        after = predictor.predict(batch)
        np.testing.assert_allclose(after.probabilities, (logits / temperature).softmax(-1).numpy(), atol=1e-6)
        assert after.labels == before.labels
        assert predictor.calibration == {"method": "temperature", "temperature": temperature}


@pytest.mark.parametrize("temperature", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_checkpoint_with_an_unusable_temperature_is_refused(tmp_path: Path, temperature: float) -> None:
    model = decisive_tiny_model()
    model.calibration_temperature = temperature
    save_checkpoint(model, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="calibration"):
        load_checkpoint(tmp_path / "bad.ckpt")


def test_the_temperature_round_trips_and_changes_the_model_version(checkpoints: dict[str, Path]) -> None:
    assert load_checkpoint(checkpoints["t2.5"]).model.calibration_temperature == 2.5
    assert load_checkpoint(checkpoints["t1"]).model.calibration_temperature == 1.0
    model = decisive_tiny_model()
    versions = set()
    for temperature in (None, 2.5):
        model.calibration_temperature = temperature
        versions.add(save_checkpoint(model, checkpoints["old"].with_name(f"v-{temperature}.ckpt")))
    assert len(versions) == 2  # default versions hash the payload: a new temperature is a new model version
