"""The serve loop against the real broker (Tansu) and Redis: outputs, dead letters, commits, groups, faults."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from typing import Any

import pytest
from test_stream_support import (
    LABELS,
    Collector,
    Running,
    produce,
    produce_posts,
    read_topic,
    stream_settings,
    valid_posts,
    wait_committed,
)

from connectors.metrics import Metrics
from core.inference import Predictor
from core.model import create_model
from stream.breaker import CircuitBreakerOpen
from stream.contracts import validator
from stream.runtime import Service

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_model(create_model("tiny", labels=LABELS))


class SlowPredictor:
    """A real predictor whose forward pass takes ``delay_s`` longer: a worker that falls behind."""

    def __init__(self, inner: Predictor, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s

    def predict(self, batch: Any) -> Any:
        time.sleep(self.delay_s)
        return self.inner.predict(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def ids(records: list[Any]) -> Counter[str]:
    return Counter(r.key.decode() for r in records)


def test_valid_posts_published_once_invalid_dead_lettered_offsets_committed(services, names, predictor):
    settings = stream_settings(services, names, limits={"max_record_bytes": 4096})
    posts = valid_posts(25) + [{"id": "nothing", "text": "", "image": {"base64": ""}}]
    garbage = {
        b"not json at all": "not_json",
        json.dumps({"text": "no id"}).encode(): "schema_invalid",
        json.dumps({"id": 7, "text": "id is a number"}).encode(): "schema_invalid",
        json.dumps({"id": "big", "text": "x" * 5000}).encode(): "too_large",
        b"\xff\xfe\x00 not utf-8": "not_utf8",
    }
    values = [json.dumps(p).encode() for p in posts] + list(garbage)
    keys = [p["id"].encode() for p in posts] + [f"bad{i}".encode() for i in range(len(garbage))]
    ends = produce(settings, values, keys)
    metrics = Metrics()

    with Running(Service(settings, predictor, metrics=metrics)):
        out = read_topic(settings, settings.kafka.output_topic, expect=len(posts))
        dlq = read_topic(settings, settings.kafka.dead_letter_topic, expect=len(garbage))
        committed = wait_committed(settings, ends)

    assert ids(out) == Counter(p["id"] for p in posts)  # each valid post exactly once, keyed by its id
    check = validator("sentiment")
    docs = {r.key.decode(): json.loads(r.value) for r in out}
    for doc in docs.values():
        assert not list(check.iter_errors(doc)), doc
    # Missing and corrupt modalities are states, not errors.
    assert docs["p3"]["modalities"]["image"] == {"state": "undecodable", "reason": "base64_invalid", "quality": None}
    assert docs["p1"]["modalities"]["image"]["state"] == "missing"
    assert docs["p4"]["modalities"]["text"]["state"] == "empty"
    assert docs["p2"]["modalities"]["text"]["state"] == "missing"
    assert docs["p0"]["modalities"]["image"]["state"] == docs["p0"]["modalities"]["text"]["state"] == "ok"
    assert docs["p0"]["label"] in LABELS and docs["p0"]["recovered"] is None
    assert docs["p1"]["recovered"] == "image"  # text only: the converter stood in for the image
    # A post with neither modality usable abstains rather than guessing.
    assert docs["nothing"]["abstained"] is True
    assert docs["nothing"]["label"] is None and docs["nothing"]["probabilities"] is None
    assert docs["nothing"]["modalities"]["image"] == {"state": "empty", "reason": "empty_value", "quality": None}
    # Dead letters: original bytes untouched, reason in the headers.
    assert sorted(r.value for r in dlq) == sorted(garbage)
    for r in dlq:
        headers = dict(r.headers)
        assert headers["postsense.reason"].decode() == garbage[r.value]
        meta = json.loads(headers["postsense.dlq"])
        assert not list(validator("dead_letter").iter_errors(meta))
        assert meta["source"]["topic"] == settings.kafka.input_topic
    assert committed == ends  # everything consumed is committed, as next-offsets
    assert metrics.posts_consumed_total.labels(topic=settings.kafka.input_topic)._value.get() == len(values)
    assert metrics.posts_dead_lettered_total.labels(reason="not_json")._value.get() == 1
