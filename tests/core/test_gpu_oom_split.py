"""Predictor's out-of-memory handling, on CPU with an injected OOM: a batch too large for the device is split
and every post still gets its result; one post that does not fit is a clear error. The real OOM on CUDA is
``tests/core/test_gpu.py::test_out_of_memory_splits_the_batch``."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from training_data import tiny_model_with_queues

from core.inference import OutOfMemoryAtOnePost, Predictor

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture
def predictor() -> Predictor:
    return Predictor.from_model(tiny_model_with_queues(LABELS))


def batch_of(predictor: Predictor, size: int):
    colours = [(40 * i % 256, 90 * i % 256, 200) for i in range(size)]
    images = [
        None if i % 5 == 3 else predictor.preprocess_image(Image.new("RGB", (40, 30), c))
        for i, c in enumerate(colours)
    ]
    texts = [None if i % 7 == 2 else f"post {i} " + "word " * (i % 6) for i in range(size)]
    return predictor.prepare(images, texts)


def fail_above(predictor: Predictor, monkeypatch: pytest.MonkeyPatch, limit: int) -> list[int]:
    """Make the model raise CUDA's OOM error for batches over ``limit`` rows; returns the sizes it was called with."""
    calls: list[int] = []
    forward = predictor.model.forward

    def forward_or_oom(batch, *args, **kwargs):
        calls.append(len(batch))
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(batch, *args, **kwargs)

    monkeypatch.setattr(predictor.model, "forward", forward_or_oom)
    return calls


def test_a_batch_too_large_is_split_and_no_post_is_lost(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = batch_of(predictor, 13)
    expected = predictor.predict(batch)
    calls = fail_above(predictor, monkeypatch, limit=4)

    got = predictor.predict(batch)

    assert calls[:3] == [13, 6, 3]  # 13 fails, the first half (6) fails, then halves fit
    assert len(got.labels) == 13 and got.labels == expected.labels
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-5)
    np.testing.assert_allclose(
        got.quality_text, expected.quality_text, atol=1e-5
    )  # NaN where absent, in place
    np.testing.assert_array_equal(got.abstained, expected.abstained)
    assert got.recovered == expected.recovered
    assert predictor.max_rows == 3

    calls.clear()
    predictor.predict(batch_of(predictor, 7))  # the next batch is cut to the size that fitted, no retry
    assert calls == [3, 3, 1]


def test_out_of_memory_at_one_post_is_a_clear_error(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_above(predictor, monkeypatch, limit=0)
    with pytest.raises(OutOfMemoryAtOnePost, match="single post"):
        predictor.predict(batch_of(predictor, 2))


def test_the_failed_attempt_is_released_before_the_halves_run(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a real out-of-memory needs and an injected one hides: the tensors the failed forward had already
    allocated must be free when the halves run, or on a full device the halves run out too."""
    held: list[weakref.ref[torch.Tensor]] = []
    alive_at_retry: list[bool] = []
    forward = predictor.model.forward

    def allocate_then_oom(batch, *args, **kwargs):
        alive_at_retry.extend(ref() is not None for ref in held)
        if len(batch) > 4:
            activations = torch.ones(len(batch), 1024)  # what a forward holds when the next allocation fails
            held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(batch, *args, **kwargs)

    monkeypatch.setattr(predictor.model, "forward", allocate_then_oom)
    got = predictor.predict(batch_of(predictor, 13))

    assert len(got.labels) == 13 and len(held) == 2  # 13 and 6 failed
    assert alive_at_retry and not any(alive_at_retry)
