"""One-file checkpoints: exact round trip, and clear errors for damaged or mismatched files."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import FORMAT_VERSION, MAGIC, CheckpointError, load_checkpoint, save_checkpoint
from core.inference import Predictor
from core.model import DRFModel, create_model

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture
def model() -> DRFModel:
    torch.manual_seed(0)
    model = create_model("tiny", LABELS, queue_size=8, encoder_options={"dim": 16}, dim=12)
    model.head.image_queue.push(torch.randn(10, 16))  # full, wrapped around (queues hold encoder features)
    model.head.text_queue.push(torch.randn(3, 16))  # still warming up
    return model.eval()


@pytest.fixture
def saved(model: DRFModel, tmp_path: Path) -> Path:
    path = tmp_path / "model.ckpt"
    save_checkpoint(model, path, model_version="v-test")
    return path


def rewrite_payload(path: Path, change) -> None:  # noqa: ANN001 - a small callable editing the payload dict
    """Rewrite a checkpoint's payload with a *valid* header, to test checks beyond the checksum."""
    raw = path.read_bytes()
    end = raw.index(b"\n")
    payload = torch.load(io.BytesIO(raw[end + 1 :]), weights_only=True)
    change(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = json.dumps(
        {"model_version": "x", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    )
    path.write_bytes(MAGIC + f" {FORMAT_VERSION} {header}\n".encode() + data)


def test_round_trip_reproduces_outputs_bit_for_bit(model: DRFModel, saved: Path) -> None:
    original = Predictor.from_model(model)
    restored = Predictor.from_checkpoint(saved, device="cpu")
    images = [original.preprocess_image(Image.new("RGB", (40, 30), c)) for c in [(255, 0, 0), (0, 9, 90)]]
    batch = original.prepare([images[0], None, images[1]], ["so good", "bad", None])
    a, b = original.predict(batch), restored.predict(batch)
    for field in ("probabilities", "quality_image", "quality_text", "fusion_weights", "image_features"):
        assert np.array_equal(getattr(a, field), getattr(b, field), equal_nan=True), field
    assert a.labels == b.labels and a.image_accepted.tolist() == b.image_accepted.tolist()
    assert (
        restored.labels == LABELS and restored.model_version == "v-test" and restored.model_name == "drf-tiny"
    )
    for key in ("image", "text"):
        assert torch.equal(original.checkpoint_queues()[key], restored.checkpoint_queues()[key])
        assert torch.equal(original.reference_stats()[key].sigma, restored.reference_stats()[key].sigma)
    assert len(restored.model.head.text_queue) == 3 and restored.model.head.text_queue.stats().warming_up


def test_checkpoint_records_configuration_preprocessing_and_versions(model: DRFModel, saved: Path) -> None:
    checkpoint = load_checkpoint(saved)
    config = checkpoint.metadata["config"]
    assert config["labels"] == LABELS and config["encoders"] == "tiny" and config["dim"] == 12
    assert config["preprocessing"]["image"]["size"] == 32
    assert checkpoint.metadata["versions"]["torch"] == str(torch.__version__)
    assert not checkpoint.model.training


def test_default_version_names_configuration_and_content(model: DRFModel, tmp_path: Path) -> None:
    version = save_checkpoint(model, tmp_path / "a.ckpt")
    assert version.startswith("drf-tiny-") and len(version) == len("drf-tiny-") + 12
    assert load_checkpoint(tmp_path / "a.ckpt").model_version == version


def test_damaged_truncated_and_foreign_files_are_rejected(saved: Path, tmp_path: Path) -> None:
    raw = bytearray(saved.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(damaged)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a postsense DRF checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_newer_format_is_refused(saved: Path) -> None:
    raw = saved.read_bytes()
    saved.write_bytes(raw.replace(MAGIC + f" {FORMAT_VERSION} ".encode(), MAGIC + b" 99 ", 1))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(saved)


def test_mismatched_weights_or_preprocessing_are_refused(saved: Path, tmp_path: Path) -> None:
    wrong_labels = tmp_path / "labels.ckpt"
    wrong_labels.write_bytes(saved.read_bytes())
    rewrite_payload(
        wrong_labels, lambda p: p["config"].update(labels=["a", "b"])
    )  # 2 classes vs 3-class weights
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(wrong_labels)
    wrong_size = tmp_path / "size.ckpt"
    wrong_size.write_bytes(saved.read_bytes())
    rewrite_payload(wrong_size, lambda p: p["config"]["preprocessing"]["image"].update(size=64))
    with pytest.raises(CheckpointError, match="preprocessing"):
        load_checkpoint(wrong_size)
    unknown = tmp_path / "unknown.ckpt"
    unknown.write_bytes(saved.read_bytes())
    rewrite_payload(unknown, lambda p: p["config"].update(encoders="resnet"))
    with pytest.raises(CheckpointError, match="cannot build"):
        load_checkpoint(unknown)
