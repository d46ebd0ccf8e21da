"""The exact shadow test: a `serve` worker pinned to the checkpoint's statistics (``redis.pin_to_checkpoint``) gives the
labels, probabilities and quality scores `postsense score` gives on the same posts, although the shared reference
queues in Redis have moved with the stream; unpinned, it scores against the moved queues and differs.

The serve side is the serve path's BatchProcessor with the worker's ReferenceQueues (what ``Service`` runs per batch)
against the session's real Redis; the score side is ``stream.offline.score``, the library behind `postsense score`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from images import png_base64

from connectors.metrics import Metrics
from core.checkpoint import save_checkpoint
from core.contracts import MODALITIES
from core.inference import Predictor
from core.model import create_model
from stream.components import open_reference_queues
from stream.offline import score
from stream.processor import BatchProcessor, Record, validate
from stream.settings import Settings, load_settings

pytestmark = pytest.mark.services

BATCH = 4
TEXTS = [
    "what a lovely day",
    "stuck in traffic again",
    "the meeting is at noon",
    "best concert ever",
    "so sad",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("tiny", labels=["negative", "neutral", "positive"], queue_size=16)
    dim = model.head.config.dim
    model.head.image_queue.push(torch.randn(10, dim) * 0.5)
    model.head.text_queue.push(torch.randn(10, dim) * 0.5 + 0.2)
    path = tmp_path_factory.mktemp("pinned") / "tiny.ckpt"
    save_checkpoint(model, path)
    return path


def posts_file(directory: Path) -> Path:
    lines = []
    for i in range(12):
        post: dict[str, Any] = {"id": f"p{i}", "text": f"{TEXTS[i % len(TEXTS)]} #{i}"}
        if i % 3:
            post["image"] = {"base64": png_base64((20 * i, 200 - 10 * i, 90))}
        lines.append(json.dumps(post))
    path = directory / "posts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def settings_for(services, checkpoint: Path, prefix: str, pinned: bool) -> Settings:
    return load_settings(
        flags={
            "redis": {"url": services.redis_url, "key_prefix": prefix, "pin_to_checkpoint": pinned},
            "model": {"checkpoint": str(checkpoint)},
        }
    )


def serve_documents(
    settings: Settings, posts: Path, drift_first: bool = False
) -> tuple[list[dict], Predictor]:
    """The serve path on ``posts``, batch by batch, with the shared queues (moved by the stream before it starts)."""
    predictor = Predictor.from_checkpoint(settings.model.checkpoint, "cpu")
    queues = open_reference_queues(settings, predictor, Metrics())  # what `serve` does at start
    try:
        processor = BatchProcessor(settings, predictor, Metrics(), queues)
        records = [
            Record(str(posts), 0, n, None, line.encode())
            for n, line in enumerate(posts.read_text().splitlines(), start=1)
        ]
        decoded = [processor.decode(r, validate(r, processor.limits)) for r in records]
        if drift_first:  # other workers' traffic: the live queues now hold these posts' own features
            features = processor.infer(decoded)
            for _ in range(2):
                queues.propose(
                    {"image": features.image_features, "text": features.text_features},
                    {m: np.ones(len(decoded), bool) for m in MODALITIES},
                )
            assert queues.refresh()
            assert min(queues.drift().values()) > 0.1, queues.drift()
        documents: list[dict] = []
        for start in range(0, len(decoded), BATCH):
            documents += processor.process(decoded[start : start + BATCH], []).documents
            assert queues.refresh()  # the queues keep moving: this batch's accepted features went in
        return documents, predictor
    finally:
        queues.close()


def scored(doc: dict) -> dict:
    """What a shadow test compares: the answer, not where or when it was computed."""
    return {k: doc[k] for k in ("id", "label", "probabilities", "modalities", "recovered", "fusion_weights")}


def test_a_pinned_serve_scores_exactly_as_score_does_while_the_shared_queues_drift(
    services, checkpoint: Path, tmp_path: Path, names: Callable[[str], str]
) -> None:
    posts = posts_file(tmp_path)
    offline = load_settings(flags={"model": {"checkpoint": str(checkpoint)}})
    score_predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    score(posts, tmp_path / "scored.jsonl", offline, score_predictor, batch_size=BATCH)
    expected = [scored(json.loads(line)) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(expected) == 12

    prefix = names("pinned")  # one set of shared queues, first moved by an unpinned worker's traffic
    unpinned, _ = serve_documents(settings_for(services, checkpoint, prefix, False), posts, drift_first=True)
    assert [scored(d) for d in unpinned] != expected  # the drift is real: unpinned, the answers move with it

    pinned, predictor = serve_documents(settings_for(services, checkpoint, prefix, True), posts)
    assert [scored(d) for d in pinned] == expected
    checkpoint_stats = Predictor.from_checkpoint(checkpoint, "cpu").reference_stats()
    for m, stats in predictor.reference_stats().items():  # after every batch went through
        assert torch.equal(stats.mean, checkpoint_stats[m].mean) and torch.equal(
            stats.sigma, checkpoint_stats[m].sigma
        )
