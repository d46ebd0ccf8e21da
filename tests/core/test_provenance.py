"""A checkpoint says what it was trained on (core.provenance, in its header), and one written before that
record existed still loads and says "training data: unknown"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint
from core.data.records import Sample
from core.model import create_model
from core.provenance import DEMO_WARNING, describe, is_demo, read_training, training_record

LABELS = ("positive", "neutral", "negative")


def samples(*labels: int) -> list[Sample]:
    return [Sample(f"s{i}", "text", None, label, LABELS) for i, label in enumerate(labels)]


def tiny(path: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    save_checkpoint(create_model("tiny", labels=list(LABELS)), path, **kwargs)
    return path


def test_a_checkpoint_without_a_training_record_still_loads_and_says_unknown(tmp_path: Path) -> None:
    path = tiny(
        tmp_path / "old.ckpt"
    )  # what save_checkpoint wrote before the record: no "training" in the header
    assert "training" not in read_header(path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.metadata["training"] is None
    assert read_training(path) is None
    assert describe(None).startswith("training data: unknown")
    assert not is_demo(None)


def test_the_record_travels_in_the_header_and_reads_without_the_payload(tmp_path: Path) -> None:
    splits = {"train": samples(0, 0, 1, 2), "dev": samples(0, 2), "test": samples(1)}
    record = training_record("tenfold:/data/10-fold-1", splits, 71.234, 69.0)
    path = tiny(tmp_path / "m.ckpt", training=record)
    assert load_checkpoint(path).metadata["training"] == record
    assert record["labels"]["train"] == {"negative": 1, "neutral": 1, "positive": 2}
    assert describe(read_training(path)) == (
        "training data: tenfold:/data/10-fold-1 (train 4, dev 2, test 1); dev accuracy 71.2 %, test accuracy 69.0 %"
    )
    assert not is_demo(record)
    # The header alone answers: a cut-off payload does not stop `postsense config` from saying it.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_training(path) == record
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_a_model_trained_on_the_vader_demo_set_is_a_demo_model() -> None:
    for spec in ("vader", "vader:data", "VADER:/x"):
        assert is_demo(training_record(spec, {"train": samples(0)}, None))
    assert not is_demo(training_record("jsonl:vader", {"train": samples(0)}, None))
    assert "postsense train --data" in DEMO_WARNING and "majority class" in DEMO_WARNING
