"""The demo model's build as a user meets it: off a terminal (``make demo > log``) its encoding and training print
a handful of progress lines, none with placeholder values, and the checkpoint says it was trained on the demo set.

The build runs on the tiny encoders and tests/training_data.py's synthetic set in place of the VADER demo set.
"""

from __future__ import annotations

import io
import itertools
import logging
import re
import sys
from pathlib import Path

import pytest
import tqdm.std
from training_data import make_dataset

import core.training.demo_model as demo_model
from core.checkpoint import load_checkpoint
from core.data import load_dataset
from core.model import create_model
from core.provenance import describe, is_demo, read_training


@pytest.fixture
def tiny_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``ensure_demo_model`` on the tiny encoders and the synthetic set (120 train posts: 40 training steps)."""
    dataset = load_dataset(f"jsonl:{make_dataset(tmp_path / 'synthetic')}")
    monkeypatch.setattr(demo_model, "load_vader", lambda data_dir: dataset)
    monkeypatch.setattr(
        demo_model,
        "create_model",
        lambda _, labels, **kw: create_model("tiny", labels, dim=32, queue_size=64),
    )
    monkeypatch.setattr(demo_model, "prepare_cpu_serving", lambda path: [], raising=False)  # no ONNX for tiny
    return tmp_path


def test_off_a_terminal_the_demo_build_logs_a_few_lines_without_placeholders(
    tiny_demo: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # as under `make demo > log`, even with pytest -s
    ticks = itertools.count()
    monkeypatch.setattr(tqdm.std, "time", lambda: next(ticks) * 0.5)  # the bars' clock: 0.5 s per look
    caplog.set_level(logging.INFO)
    demo_model.ensure_demo_model(tiny_demo / "data", tiny_demo / "demo.ckpt")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    progress = [m for m in lines if r"it/s" in m or "step" in m or "img" in m or "text" in m]
    assert len(lines) <= 20, "\n".join(lines)
    assert progress, "the bars said nothing at all in what were minutes of their clock"
    # No "?" rate before anything was measured, no dev accuracy before any was.
    assert not [m for m in progress if "?" in m or re.search(r"-1\.0\b", m)], "\n".join(progress)


def test_the_demo_checkpoint_says_it_was_trained_on_the_demo_set(tiny_demo: Path) -> None:
    path = demo_model.ensure_demo_model(tiny_demo / "data", tiny_demo / "demo.ckpt", progress=False)
    record = read_training(path)
    assert record is not None and is_demo(record)
    assert record["data"] == f"vader:{tiny_demo / 'data'}"
    assert record["sizes"] == {"train": 120, "dev": 40}
    assert sum(record["labels"]["train"].values()) == 120
    assert 0 <= record["dev_accuracy"] <= 100 and record["test_accuracy"] is None
    assert load_checkpoint(path).metadata["training"] == record
    assert describe(record).startswith(f"training data: vader:{tiny_demo / 'data'} (train 120, dev 40)")
    # Trained as `postsense train` trains by default: on the posts intact and damaged (the product regime).
    assert record["regime"] == {"regime": "product", "intact": 0.5, "seed": 0}
