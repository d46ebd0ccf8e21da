"""A tiny synthetic image-text data set for the training and evaluation tests (no tests here).

It is written in the service's JSONL post schema: texts mix label words with filler, images are noisy patches whose
colour leans towards the label, and half the samples are positive, so the majority class scores about 50 % and a
model must learn to beat it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.data import SENTIMENT_LABELS
from core.model import DRFModel, create_model

WORDS = {
    "positive": ["great", "love", "happy", "wonderful", "sunny", "win"],
    "neutral": ["meeting", "table", "monday", "report", "bus", "paper"],
    "negative": ["awful", "hate", "sad", "terrible", "rain", "lost"],
}
FILLER = ["the", "today", "we", "just", "about", "so", "with", "friends", "again", "city"]
COLOURS = {"positive": (220, 150, 40), "neutral": (128, 128, 128), "negative": (40, 60, 150)}
SPLIT_SIZES = {"train": 120, "dev": 40, "test": 40}


def make_dataset(root: Path, seed: int = 0) -> Path:
    """Write train/dev/test.jsonl and images/ under ``root``; returns ``root`` (use as ``jsonl:ROOT``)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, size in SPLIT_SIZES.items():
        lines = []
        for i in range(size):
            label = str(rng.choice(SENTIMENT_LABELS, p=[0.5, 0.25, 0.25]))
            words = list(rng.choice(WORDS[label], size=2)) + list(rng.choice(FILLER, size=4))
            if rng.random() < 0.2:  # some texts carry another label's word: not trivially separable
                words.append(str(rng.choice(WORDS[str(rng.choice(SENTIMENT_LABELS))])))
            rng.shuffle(words)
            colour = np.array(COLOURS[label], dtype=np.float32)
            pixels = np.clip(colour + rng.normal(0, 50, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            name = f"{split}-{i}.png"
            Image.fromarray(pixels).save(root / "images" / name)
            post = {
                "schema_version": 1,
                "id": f"{split}-{i}",
                "text": " ".join(words),
                "image": {"path": f"images/{name}"},
                "created_at": None,
                "metadata": {},
                "label": label,
            }
            lines.append(json.dumps(post))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def tiny_model_with_queues(labels: list[str], seed: int = 0) -> DRFModel:
    """The tiny configuration with 8 small features in each queue, so quality scores are defined (seeded)."""
    torch.manual_seed(seed)
    model = create_model("tiny", labels, queue_size=16)
    model.head.image_queue.push(torch.randn(8, 32) * 0.1)
    model.head.text_queue.push(torch.randn(8, 32) * 0.1)
    return model


def train_with_cli(
    data_root: Path, work: Path, capsys: Any, *extra: str, epochs: int = 2
) -> tuple[Path, dict[str, Any]]:
    """``postsense train`` on ``data_root`` with the tiny encoders, as a user runs it; the checkpoint it wrote and
    the summary it printed (after the data set's report). ``extra`` are more train options."""
    from stream.cli import main

    out = work / "model.ckpt"
    args = [
        "--device",
        "cpu",
        "train",
        "--data",
        f"jsonl:{data_root}",
        "--encoders",
        "tiny",
        "--out",
        str(out),
    ]
    args += ["--epochs", str(epochs), "--batch-size", "32", "--queue-size", "32"]
    args += ["--cache-dir", str(work / "cache"), "--no-progress", *extra]
    try:
        main(args)
    except SystemExit as done:
        assert done.code == 0, f"postsense train exited {done.code}"
    printed = capsys.readouterr().out
    return out, json.loads(printed[printed.index("{\n") :])
