"""The DRF worker on a CUDA GPU: precision, device moves of checkpoints, ``serve`` through the real broker, and
out-of-memory. Marked ``gpu`` and skipped without CUDA; ``scripts/gpu-check`` runs them on a GPU machine.

``POSTSENSE_GPU_DRY_RUN=1`` (``scripts/gpu-check --dry-run``) runs the same tests on the CPU with the tiny
encoders and small samples, so they cannot rot between the sessions that have a GPU; the real out-of-memory
test needs CUDA's allocator and stays skipped there (``tests/core/test_gpu_oom_split.py`` covers the split on CPU).

Tolerances, on a fixed sample of real posts (crops of scikit-learn's two photos, VADER's rated tweets, some
posts without image or text) against the float32 CPU result of the same model:

* labels agree on >= 99 % of posts (the project's bar), in float32 and in mixed precision;
* quality ``q = exp(-d)`` is compared through ``d = -log q`` (the scaled squared distance to the reference
  mean), relative to ``max(1, d)``: float32 on the GPU within 1 %, because cuDNN convolutions run in TF32 by
  default (10-bit mantissa, ~1e-3 relative per product) and that error grows through ~20 layers; mixed
  precision within 5 %, because bfloat16 keeps 8 bits (4e-3 per rounding) and the CPU lever measured feature
  differences of 3-6e-3 from bfloat16 autocast on these encoders (BENCHMARKS.md, levers); float16 (GPUs
  without bfloat16) has more mantissa and fits the same bound. A ``d`` of 10 is ``q = 4.5e-5``: a relative
  bound keeps that as meaningful as ``q = 0.5``.
"""

from __future__ import annotations

import os
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from stream_support import LABELS, Running, produce_posts, read_topic, stream_settings, valid_posts

from core.checkpoint import save_checkpoint
from core.encoders.configs import training_options
from core.inference import OutOfMemoryAtOnePost, Predictor
from core.model import DRFModel, PreparedBatch, create_model

DRY_RUN = os.environ.get("POSTSENSE_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
CONFIG = "tiny" if DRY_RUN else "offline"
SAMPLE = 24 if DRY_RUN else 256
AGREEMENT = 0.99
QUALITY_TOLERANCE = {False: 0.01, True: 0.05}  # by mixed precision; see the module docstring

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not DRY_RUN and not torch.cuda.is_available(),
        reason="no CUDA device: scripts/gpu-check runs these on a GPU (POSTSENSE_GPU_DRY_RUN=1: on CPU, tiny)",
    ),
]


@cache
def rated_tweets() -> list:
    from core.data.vader import default_data_dir, fetch_sdist, read_rated_tweets

    return read_rated_tweets(fetch_sdist(default_data_dir() / "cache"))


def sample_posts(n: int, start: int = 0) -> tuple[list, list[str | None], list[int]]:
    """Posts ``start..start+n`` of a fixed sequence: a crop of a real photo (every 7th missing), a real tweet
    (every 11th missing) and the tweet's VADER label."""
    from bench.common import sample_photos
    from core.data.vader import valence_label

    photos, tweets = sample_photos(), rated_tweets()
    images, texts, labels = [], [], []
    for i in range(start, start + n):
        photo, tweet = photos[i % len(photos)], tweets[(97 * i) % len(tweets)]
        w, h = (
            photo.width // 2 + (37 * i) % (photo.width // 2),
            photo.height // 2 + (53 * i) % (photo.height // 2),
        )
        left, top = (29 * i) % (photo.width - w + 1), (31 * i) % (photo.height - h + 1)
        images.append(None if i % 7 == 3 else photo.crop((left, top, left + w, top + h)))
        texts.append(None if i % 11 == 5 else tweet.text)
        labels.append(valence_label(tweet.valence))
    return images, texts, labels


def predict_all(predictor: Predictor, images: list, texts: list[str | None], batch: int = 64):
    from core.inference import BatchPrediction

    pixels = [None if im is None else predictor.preprocess_image(im) for im in images]
    return BatchPrediction.concat(
        [
            predictor.predict(predictor.prepare(pixels[i : i + batch], texts[i : i + batch]))
            for i in range(0, len(pixels), batch)
        ]
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the configuration's model, its head trained briefly on CPU on other posts of the same
    sequence, so labels have real margins and the reference queues real contents (an untrained head's
    near-uniform probabilities would make any rounding flip labels). Every predictor below loads it."""
    from core.model import FeatureTable
    from core.training import CachedSource, TrainConfig, fit

    torch.manual_seed(0)
    # The product's encoders (Lite1, tweets), in eager torch so the GPU runs them.
    options = {**training_options("offline"), "image_runtime": "torch"} if CONFIG == "offline" else {}
    model = create_model(CONFIG, LABELS, pretrained=CONFIG == "offline", encoder_options=options)
    predictor = Predictor.from_model(model)
    images, texts, labels = sample_posts(2 * SAMPLE, start=SAMPLE)
    batch = predictor.prepare(
        [None if im is None else predictor.preprocess_image(im) for im in images], texts
    )
    with torch.inference_mode():
        image, text = model.encode_batch(batch)
    table = FeatureTable(
        image.clone(), text.clone(), batch.image_present, batch.text_present, torch.tensor(labels)
    )
    fit(model, CachedSource(table), CachedSource(table), TrainConfig(epochs=30, batch_size=64, head_lr=1e-3))
    path = tmp_path_factory.mktemp("gpu") / "model.pt"
    save_checkpoint(model.eval(), path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    images, texts, _ = sample_posts(SAMPLE)
    return predict_all(Predictor.from_checkpoint(checkpoint, device="cpu"), images, texts)


def relative_distance_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |d_got - d_want| / max(1, d_want) with d = -log q, over the posts that have the modality."""
    present = ~np.isnan(want)
    assert (present == ~np.isnan(got)).all()
    d_got, d_want = -np.log(got[present]), -np.log(want[present])
    return float(np.max(np.abs(d_got - d_want) / np.maximum(1.0, d_want), initial=0.0))


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["float32", "mixed"])
def test_gpu_agrees_with_float32_cpu(checkpoint: Path, reference, mixed_precision: bool) -> None:
    predictor = Predictor.from_checkpoint(checkpoint, device=DEVICE, mixed_precision=mixed_precision)
    if DEVICE == "cuda" and mixed_precision:
        assert predictor._amp_dtype in (torch.bfloat16, torch.float16)
    images, texts, _ = sample_posts(SAMPLE)
    got = predict_all(predictor, images, texts)

    agreement = np.mean([a == b for a, b in zip(got.labels, reference.labels, strict=True)])
    tolerance = QUALITY_TOLERANCE[mixed_precision]
    errors = {
        m: relative_distance_error(getattr(got, f"quality_{m}"), getattr(reference, f"quality_{m}"))
        for m in ("image", "text")
    }
    print(
        f"{DEVICE} mixed={mixed_precision}: labels {dict(Counter(reference.labels))}, agree on {agreement:.2%}; "
        f"quality error {errors} (bound {tolerance})"
    )
    assert agreement >= AGREEMENT
    assert max(errors.values()) <= tolerance
    assert got.recovered == reference.recovered and (got.abstained == reference.abstained).all()
    np.testing.assert_allclose(got.probabilities.sum(-1), 1.0, atol=1e-3)


def trained_tiny(device: str, steps: int = 5) -> DRFModel:
    """A tiny model after a few optimiser steps on ``device`` (weights and reference queues both changed)."""
    torch.manual_seed(1)
    model = create_model("tiny", LABELS, queue_size=32).to(device).train()
    optimiser = torch.optim.AdamW(model.parameter_groups(encoder_lr=1e-4, head_lr=1e-2))
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        batch = PreparedBatch(
            torch.randn(8, 3, 32, 32, generator=generator),
            torch.tensor([True] * 7 + [False]),
            model.text_encoder.tokenize([f"post {step} {i}" for i in range(8)]),
            torch.tensor([True] * 6 + [False, True]),
        ).to(device)
        out = model(batch, labels=torch.randint(0, 3, (8,), generator=generator).to(device))
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        model.update_queues(out)
    return model.eval()


@pytest.mark.parametrize(
    "trained_on, served_on", [("cpu", DEVICE), (DEVICE, "cpu")], ids=["cpu-to-gpu", "gpu-to-cpu"]
)
def test_checkpoint_moves_between_cpu_and_gpu(tmp_path: Path, trained_on: str, served_on: str) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(trained_tiny(trained_on), path)
    images, texts, _ = sample_posts(16)
    there = predict_all(
        Predictor.from_checkpoint(path, device=served_on, mixed_precision=False), images, texts
    )
    here = predict_all(
        Predictor.from_checkpoint(path, device=trained_on, mixed_precision=False), images, texts
    )
    assert there.labels == here.labels
    np.testing.assert_allclose(there.probabilities, here.probabilities, atol=1e-4)
    np.testing.assert_allclose(there.quality_text, here.quality_text, rtol=1e-3)


@pytest.mark.services
def test_serve_on_gpu_through_the_real_broker(services, names, checkpoint: Path) -> None:
    from stream.runtime import Service

    settings = stream_settings(services, names)
    posts = valid_posts(40)
    produce_posts(settings, posts)
    predictor = Predictor.from_checkpoint(checkpoint, device=DEVICE)
    with Running(Service(settings, predictor)):
        out = read_topic(settings, settings.kafka.output_topic, expect=len(posts))
    assert Counter(r.key.decode() for r in out) == Counter(p["id"] for p in posts)
    assert predictor.device.type == DEVICE


@pytest.mark.skipif(DRY_RUN, reason="a real out-of-memory needs CUDA's allocator")
def test_out_of_memory_splits_the_batch_and_loses_no_post(checkpoint: Path) -> None:
    """Cap this process's share of GPU memory just above what a small batch needs: a large batch then runs out
    of memory for real, is split, and every post still gets the result it gets unsplit."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cuda", mixed_precision=False)
    images, texts, _ = sample_posts(SAMPLE)
    unsplit = predict_all(predictor, images, texts, batch=SAMPLE)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    predict_all(predictor, images[:8], texts[:8], batch=8)
    needed = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        torch.cuda.set_per_process_memory_fraction((base + 2 * needed) / total)
        split = predict_all(predictor, images, texts, batch=SAMPLE)
        assert predictor.max_rows is not None and predictor.max_rows < SAMPLE
        assert split.labels == unsplit.labels
        np.testing.assert_allclose(split.probabilities, unsplit.probabilities, atol=1e-4)

        torch.cuda.set_per_process_memory_fraction((base + needed // 64) / total)
        predictor.max_rows = None
        with pytest.raises(OutOfMemoryAtOnePost, match="single post"):
            predict_all(predictor, images[:2], texts[:2], batch=2)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
