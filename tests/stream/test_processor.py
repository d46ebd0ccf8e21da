"""The batch processor without a broker: media settings honoured, states per modality, reference-queue call site."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from images import png_base64
from PIL import Image
from stream_support import LABELS

from connectors.metrics import Metrics
from core.contracts import Invalid, Post
from core.inference import Predictor
from core.model import create_model
from stream.processor import BatchProcessor, Record, validate
from stream.settings import load_settings


def run(processor: BatchProcessor, posts: list[dict]) -> dict[str, dict]:
    """Documents by post id for ``posts`` processed as one batch."""
    decoded = []
    for offset, doc in enumerate(posts):
        record = Record("posts", 0, offset, doc["id"].encode(), json.dumps(doc).encode())
        post = validate(record, processor.limits)
        assert isinstance(post, Post), post
        decoded.append(processor.decode(record, post))
    result = processor.process(decoded, [])
    return {d["id"]: d for d in result.documents}


def test_local_image_paths_are_read_only_inside_the_configured_root(tmp_path: Path, predictor):
    root = tmp_path / "media"
    root.mkdir()
    Image.new("RGB", (30, 20), (0, 200, 0)).save(root / "ok.png")
    Image.new("RGB", (30, 20), (0, 200, 0)).save(tmp_path / "secret.png")
    processor = BatchProcessor(
        load_settings(None, {"media": {"local_root": str(root)}}), predictor, Metrics()
    )
    docs = run(
        processor,
        [
            {"id": "inside", "text": "hi", "image": {"path": "ok.png"}},
            {"id": "escape", "text": "hi", "image": {"path": "../secret.png"}},
        ],
    )
    assert docs["inside"]["modalities"]["image"]["state"] == "ok"
    assert docs["escape"]["modalities"]["image"] == {
        "state": "undecodable",
        "reason": "path_outside_root",
        "quality": None,
    }
    # Without a root, local paths are refused outright.
    default = BatchProcessor(load_settings(None, {}), predictor, Metrics())
    assert (
        run(default, [{"id": "x", "image": {"path": str(root / "ok.png")}}])["x"]["modalities"]["image"][
            "reason"
        ]
        == "path_refused"
    )


def test_image_urls_to_private_addresses_are_refused_by_default(predictor):
    processor = BatchProcessor(load_settings(None, {}), predictor, Metrics())
    doc = run(processor, [{"id": "u", "text": "look", "image": {"url": "http://127.0.0.1:9/cat.png"}}])["u"]
    assert doc["modalities"]["image"]["reason"] == "fetch_refused_private_address"
    assert doc["modalities"]["text"]["state"] == "ok" and doc["label"] in LABELS  # still scored on its text


def test_image_size_limit_from_settings_makes_a_large_image_undecodable(predictor):
    settings = load_settings(None, {"limits": {"max_image_pixels": 1024}})
    processor = BatchProcessor(settings, predictor, Metrics())
    doc = run(processor, [{"id": "big", "text": "t", "image": {"base64": png_base64(size=(64, 64))}}])["big"]
    assert doc["modalities"]["image"] == {
        "state": "undecodable",
        "reason": "too_many_pixels",
        "quality": None,
    }


def test_a_record_that_is_not_a_post_becomes_a_dead_letter_with_the_original_bytes(predictor):
    processor = BatchProcessor(load_settings(None, {}), predictor, Metrics())
    record = Record("posts", 3, 41, b"k", b"\x00garbage")
    why = validate(record, processor.limits)
    assert isinstance(why, Invalid)
    result = processor.process([], [(record, why)])
    (letter,) = result.records
    assert (letter.topic, letter.key, letter.value) == ("posts.dlq", b"k", b"\x00garbage")
    assert dict(letter.headers)["postsense.reason"] == b"not_json"
    assert result.documents == []


@pytest.mark.services
def test_reference_queues_feed_the_predictor_and_take_its_accepted_features(services, names, predictor):
    from connectors.reference_queues import ReferenceQueues

    settings = load_settings(None, {"redis": {"url": services.redis_url, "key_prefix": names("q")}})
    dim = predictor.model.head.config.dim
    rng = np.random.default_rng(0)
    seeded = {m: rng.normal(size=(16, dim)).astype(np.float32) for m in ("image", "text")}
    own = Predictor.from_model(create_model("tiny", labels=LABELS))
    with ReferenceQueues(settings.redis, "test-model", Metrics()) as queues:
        queues.seed(seeded, capacity=64)  # warming up: every present feature is accepted
        processor = BatchProcessor(settings, own, Metrics(), queues)
        posts = [{"id": f"p{i}", "text": f"text {i}", "image": {"base64": png_base64()}} for i in range(4)]
        run(processor, posts)
        # The shared statistics were swapped in before predicting...
        assert np.allclose(own.reference_stats()["text"].mean.numpy(), seeded["text"].mean(0), atol=1e-5)
        # ...and the batch's accepted features went to Redis in the same call.
        queues.refresh()
        assert queues.stats()["image"].count == 16 + 4
        assert queues.stats()["text"].count == 16 + 4


def test_jpegs_decode_at_the_models_input_size_and_not_larger(predictor, monkeypatch):
    """A camera-sized JPEG is DCT-scaled down to the shorter side the model's preprocessing needs (not more), so
    the decode pool does not decode and resize pixels the encoder never sees; the input tensor is the encoder's."""
    import io

    from connectors import media

    processor = BatchProcessor(load_settings(None, {}), predictor, Metrics())
    size = predictor.decode_size
    assert processor.media_limits.draft_size == (size, size)
    buffer = io.BytesIO()
    Image.new("RGB", (size * 9, size * 6), (200, 40, 40)).save(buffer, "JPEG", quality=90)
    seen = []
    real_decode = media.decode_image_field

    def spy(field, limits, policy):
        outcome = real_decode(field, limits, policy)
        seen.append(outcome.image.size)
        return outcome

    monkeypatch.setattr("stream.processor.decode_image_field", spy)
    import base64

    doc = {"id": "big", "text": "hi", "image": {"base64": base64.b64encode(buffer.getvalue()).decode()}}
    assert run(processor, [doc])["big"]["modalities"]["image"]["state"] == "ok"
    (decoded,) = seen
    assert size <= min(decoded) < 2 * size  # 6x the size on its shorter side: decoded at 1/4 scale, not 1/1


def test_decode_size_follows_the_preprocessing_of_each_encoder_configuration():
    tiny = Predictor.from_model(create_model("tiny", LABELS))
    assert tiny.decode_size == tiny.model.image_encoder.preprocessing.size == 32
