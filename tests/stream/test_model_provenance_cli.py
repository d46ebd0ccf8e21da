"""What a user is told about the model at start: `score`, `serve` and `postsense config` say what the checkpoint was
trained on, and a model trained on the VADER demo set comes with a warning and the command that trains a real one.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stream_support import LABELS

from core.checkpoint import save_checkpoint
from core.data.records import Sample
from core.model import create_model
from core.provenance import training_record
from stream.settings import load_settings


def checkpoint(path: Path, data: str | None) -> Path:
    """A tiny model whose header records training on ``data`` (None: no record, as before records existed)."""
    torch.manual_seed(0)
    labels = tuple(LABELS)
    splits = {"train": [Sample(f"t{i}", "x", None, i % 3, labels) for i in range(30)]}
    record = None if data is None else training_record(data, splits, 74.0, 72.5)
    save_checkpoint(create_model("tiny", labels=list(LABELS)), path, training=record)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("models")
    return {
        "demo": checkpoint(directory / "demo.ckpt", "vader:data"),
        "own": checkpoint(directory / "own.ckpt", "jsonl:/srv/our-posts"),
        "old": checkpoint(directory / "old.ckpt", None),
    }


def postsense(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream", *args], capture_output=True, text=True, timeout=180, check=False
    )


def test_score_says_what_the_model_was_trained_on_and_warns_about_a_demo_model(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    posts = tmp_path / "posts.jsonl"
    posts.write_text(json.dumps({"id": "a", "text": "what a lovely day"}) + "\n")
    demo = postsense(
        "--checkpoint", str(models["demo"]), "score", str(posts), "--out", str(tmp_path / "d.jsonl")
    )
    assert demo.returncode == 0, demo.stderr
    assert "training data: vader:data (train 30); dev accuracy 74.0 %, test accuracy 72.5 %" in demo.stderr
    assert "demo model" in demo.stderr and "majority class" in demo.stderr
    assert "postsense train --data" in demo.stderr
    own = postsense(
        "--checkpoint", str(models["own"]), "score", str(posts), "--out", str(tmp_path / "o.jsonl")
    )
    assert own.returncode == 0, own.stderr
    assert "training data: jsonl:/srv/our-posts" in own.stderr and "demo model" not in own.stderr


def test_serve_warns_at_start_about_a_demo_model(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import stream.commands.serve as serve

    class NoLoop:  # everything of serve's start but the consumer loop (no broker needed)
        def __init__(self, *args, **kwargs) -> None:
            self.last_poll = 0.0

        def ready(self) -> bool:
            return False

        def run(self) -> None:
            pass

    monkeypatch.setattr(serve, "Service", NoLoop)
    settings = load_settings(None, {"model": {"checkpoint": str(models["demo"])}, "metrics": {"port": 0}})
    args = argparse.Namespace(no_reference_queues=True, create_topics=None, precision=None)
    caplog.set_level(logging.INFO)
    assert serve.run(args, settings) == serve.EXIT_OK
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("demo model" in m and "postsense train --data" in m for m in warnings), warnings
    assert any("training data: vader:data" in r.getMessage() for r in caplog.records)


def test_config_shows_the_configured_checkpoint_s_training_data(models: dict[str, Path]) -> None:
    for name, expected in (
        ("demo", "training data: vader:data"),
        ("own", "training data: jsonl:/srv/our-posts"),
        ("old", "training data: unknown"),
    ):
        result = postsense("--checkpoint", str(models[name]), "config")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["model"]["checkpoint"] == str(models[name])  # stdout stays JSON
        assert f"model.checkpoint {models[name]}: {expected}" in result.stderr
        assert ("demo model" in result.stderr) == (name == "demo")
