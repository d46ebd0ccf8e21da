"""The serve loop against the real broker (Tansu) and Redis: outputs, dead letters, commits, groups, faults."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from typing import Any

import pytest
import torch
from helpers import strict_json, wait_until
from stream_support import (
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

from connectors.kafka import ensure_topics
from connectors.metrics import Metrics
from core.contracts import validator
from core.inference import Predictor
from stream.breaker import CircuitBreakerOpen
from stream.runtime import Service

pytestmark = pytest.mark.services


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
    assert docs["p3"]["modalities"]["image"] == {
        "state": "undecodable",
        "reason": "base64_invalid",
        "quality": None,
    }
    assert docs["p1"]["modalities"]["image"]["state"] == "missing"
    assert docs["p4"]["modalities"]["text"]["state"] == "empty"
    assert docs["p2"]["modalities"]["text"]["state"] == "missing"
    assert docs["p0"]["modalities"]["image"]["state"] == docs["p0"]["modalities"]["text"]["state"] == "ok"
    assert docs["p0"]["label"] in LABELS and docs["p0"]["recovered"] is None
    assert docs["p1"]["recovered"] == "image"  # text only: the converter stood in for the image
    # A post with neither modality usable abstains rather than guessing.
    assert docs["nothing"]["abstained"] is True
    assert docs["nothing"]["label"] is None and docs["nothing"]["probabilities"] is None
    assert docs["nothing"]["modalities"]["image"] == {
        "state": "empty",
        "reason": "empty_value",
        "quality": None,
    }
    # Dead letters: original bytes untouched, reason in the headers.
    assert sorted(r.value for r in dlq) == sorted(garbage)
    for r in dlq:
        headers = dict(r.headers)
        assert headers["postsense.reason"].decode() == garbage[r.value]
        meta = json.loads(headers["postsense.dlq"])
        assert not list(validator("dead_letter").iter_errors(meta))
        assert meta["source"]["topic"] == settings.kafka.input_topic
    assert committed == ends  # everything consumed is committed, as next-offsets
    consumed = {"topic": settings.kafka.input_topic}
    assert metrics.registry.get_sample_value("postsense_posts_consumed_total", consumed) == len(values)
    assert (
        metrics.registry.get_sample_value("postsense_posts_dead_lettered_total", {"reason": "not_json"}) == 1
    )


def test_non_finite_numbers_are_dead_lettered_and_every_published_record_is_strict_json(
    services, names, predictor
):
    settings = stream_settings(services, names, partitions=2)
    posts = valid_posts(10)
    refused = {  # each parses with Python's json (1e400 as inf); none is a post
        b'{"id": "nan", "text": "t", "metadata": {"score": NaN}}': "nan",
        b'{"id": "inf", "text": "t", "metadata": {"scores": [1, Infinity]}}': "inf",
        b'{"id": "minus-inf", "text": "t", "metadata": {"a": {"b": -Infinity}}}': "minus-inf",
        b'{"id": "big", "text": "t", "metadata": {"views": 1e400}}': "big",
    }
    values = [json.dumps(p).encode() for p in posts] + list(refused)
    keys = [p["id"].encode() for p in posts] + [k.encode() for k in refused.values()]
    ends = produce(settings, values, keys)
    metrics = Metrics()

    with Running(Service(settings, predictor, metrics=metrics)):
        out = read_topic(settings, settings.kafka.output_topic, expect=len(posts))
        dlq = read_topic(settings, settings.kafka.dead_letter_topic, expect=len(refused))
        committed = wait_committed(settings, ends)

    assert ids(out) == Counter(p["id"] for p in posts)
    for record in out:  # every sentiment record parses with a strict parser
        assert not list(validator("sentiment").iter_errors(strict_json(record.value)))
    assert sorted(r.value for r in dlq) == sorted(refused)  # dead-lettered, original bytes untouched
    for letter in dlq:
        headers = dict(letter.headers)
        assert headers["postsense.reason"] == b"non_finite_number"
        meta = strict_json(headers["postsense.dlq"])
        assert meta["reason"] == "non_finite_number" and not list(validator("dead_letter").iter_errors(meta))
        assert letter.key.decode() == refused[letter.value]
    assert committed == ends
    dead = metrics.registry.get_sample_value(
        "postsense_posts_dead_lettered_total", {"reason": "non_finite_number"}
    )
    assert dead == len(refused)


class ThreadCountingPredictor:
    """A real predictor that notes torch's thread count on the thread of each call: decoding and the model."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.counts: dict[str, set[int]] = {"preprocess_image": set(), "predict": set()}

    def preprocess_image(self, image: Any) -> Any:
        self.counts["preprocess_image"].add(torch.get_num_threads())
        return self.inner.preprocess_image(image)

    def predict(self, batch: Any) -> Any:
        self.counts["predict"].add(torch.get_num_threads())
        return self.inner.predict(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_decode_threads_run_torch_on_one_thread_and_the_model_on_the_services_count(
    services, names, predictor
):
    """Each decode thread led an OpenMP team as wide as the machine, spinning on the model's cores; the model's
    own thread count must not follow the decode threads' one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the default of threads started from here on: the service's thread gets 2
    try:
        settings = stream_settings(services, names)
        produce_posts(settings, valid_posts(12))
        counting = ThreadCountingPredictor(predictor)
        with Running(Service(settings, counting, metrics=Metrics())):  # type: ignore[arg-type]
            read_topic(settings, settings.kafka.output_topic, expect=12)
        assert counting.counts == {"preprocess_image": {1}, "predict": {2}}
        late: list[int] = []
        started = threading.Thread(target=lambda: late.append(torch.get_num_threads()))
        started.start()
        started.join()
        assert late == [2]  # the decode threads' count did not outlive the service
    finally:
        torch.set_num_threads(before)


def test_stopped_mid_stream_and_restarted_loses_nothing(services, names, predictor):
    settings = stream_settings(services, names)
    posts = valid_posts(60)
    ends = produce_posts(settings, posts)
    first = Collector()
    service = Service(settings, predictor, on_output=first)
    with Running(service) as running:
        assert first.wait_for(1)
        running.stop()  # mid-stream: the batches in hand are finished and committed, the rest stays unread
    assert len(first.documents) < len(posts)

    second = Collector()
    with Running(Service(settings, predictor, on_output=second)):
        assert second.wait_for(len(posts) - len(first.documents))
        committed = wait_committed(settings, ends)
    seen = Counter(d["id"] for d in first.documents + second.documents)
    assert set(seen) == {p["id"] for p in posts}  # no post lost
    assert max(seen.values()) == 1  # a graceful stop commits what it published: nothing twice
    assert committed == ends


def test_two_consumers_split_partitions_and_outputs_are_complete(services, names, predictor):
    settings = stream_settings(services, names, partitions=4)
    posts = valid_posts(120)
    ends = produce_posts(settings, posts[:80])
    a_metrics, b_metrics = Metrics(), Metrics()
    a, b = Collector(), Collector()
    # The first member is slow enough to still hold batches in flight when the second one joins.
    with Running(Service(settings, SlowPredictor(predictor, 0.4), metrics=a_metrics, on_output=a)):
        assert a.wait_for(1)
        with Running(Service(settings, predictor, metrics=b_metrics, on_output=b)) as second:
            assert wait_until(second.service.ready, 30), "the second member never got partitions"
            assert len(a.documents) < 80, "the first member finished before the rebalance"
            ends.update({p: max(e, ends.get(p, 0)) for p, e in produce_posts(settings, posts[80:]).items()})
            out = read_topic(settings, settings.kafka.output_topic, expect=len(posts))
            committed = wait_committed(settings, ends)
            assert b.documents, "the second member produced nothing"
    assert {r.key.decode() for r in out} == {p["id"] for p in posts}
    # The first member drained and committed its batches on revoke: the rebalance published nothing twice.
    assert max(ids(out).values()) == 1
    assert committed == ends
    for m in (a_metrics, b_metrics):
        assert not m.registry.get_sample_value("postsense_rebalances_total", {"event": "lost"})


def test_slow_worker_pauses_and_resumes_without_losing_membership(services, names, predictor, caplog):
    # The model takes longer per batch than max.poll.interval: without pausing and polling meanwhile,
    # the member would be evicted and its batches redelivered.
    settings = stream_settings(
        services,
        names,
        partitions=2,
        kafka={"max_poll_interval_ms": 1500},
        batch={"max_posts": 4, "max_wait_ms": 50, "max_inflight_batches": 1},
    )
    posts = valid_posts(16)
    ends = produce_posts(settings, posts)
    metrics = Metrics()
    caplog.set_level(logging.DEBUG, logger="stream.runtime")
    collector = Collector()
    with Running(Service(settings, SlowPredictor(predictor, 2.0), metrics=metrics, on_output=collector)):
        assert collector.wait_for(len(posts), timeout_s=90)
        committed = wait_committed(settings, ends)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("paused partitions") for m in messages)
    assert any(m.startswith("resumed partitions") for m in messages)
    assert (
        metrics.registry.get_sample_value("postsense_rebalances_total", {"event": "assigned"}) == 1
    )  # never rejoined
    assert not metrics.registry.get_sample_value("postsense_rebalances_total", {"event": "lost"})
    assert Counter(d["id"] for d in collector.documents) == Counter(p["id"] for p in posts)
    assert max(collector.batch_sizes) <= 4  # micro-batches never exceed batch.max_posts
    assert committed == ends


def test_circuit_breaker_stops_on_a_stream_of_garbage(services, names, predictor):
    settings = stream_settings(
        services,
        names,
        partitions=1,
        batch={"max_posts": 4, "max_wait_ms": 50},
        dead_letter={"max_consecutive_invalid": 10, "min_window": 5, "window": 50, "max_invalid_ratio": 0.9},
    )
    produce_posts(settings, valid_posts(2))
    produce(settings, [b"garbage %d" % i for i in range(40)])
    metrics = Metrics()
    running = Running(Service(settings, predictor, metrics=metrics))
    with running:
        running.thread.join(30)
        assert not running.thread.is_alive(), "the breaker did not stop the service"
    assert isinstance(running.error, CircuitBreakerOpen)
    assert "invalid records in a row" in str(running.error)
    assert metrics.registry.get_sample_value("postsense_circuit_breaker_open") == 1
    dlq = read_topic(settings, settings.kafka.dead_letter_topic, expect=40, timeout_s=3)
    assert len(dlq) < 10  # stopped rather than dead-lettering the topic
    committed = wait_committed(settings, {0: 1}, timeout_s=5)
    assert committed[0] == 2 + len(dlq)  # the valid posts and the dead letters before the trip, nothing after


def test_static_group_membership_consumes_and_restarts_with_the_same_instance_id(services, names, predictor):
    settings = stream_settings(services, names, partitions=2, kafka={"group_instance_id": names("pod")})
    posts = valid_posts(20)
    ends = produce_posts(settings, posts[:10])
    first = Collector()
    with Running(Service(settings, predictor, on_output=first)):
        assert first.wait_for(10)
    ends.update({p: max(e, ends.get(p, 0)) for p, e in produce_posts(settings, posts[10:]).items()})
    second = Collector()
    with Running(Service(settings, predictor, on_output=second)):  # the same pod identity comes back
        assert second.wait_for(10)
        committed = wait_committed(settings, ends)
    assert Counter(d["id"] for d in first.documents + second.documents) == Counter(p["id"] for p in posts)
    assert committed == ends


def test_broker_restart_mid_stream_the_service_recovers_and_scores_new_posts(services, names, predictor):
    settings = stream_settings(services, names, partitions=2, kafka={"produce_timeout_s": 3.0})
    k = settings.kafka
    metrics = Metrics()
    out = Collector()
    with Running(Service(settings, predictor, metrics=metrics, on_output=out)) as running:
        produce_posts(settings, valid_posts(10, prefix="before"))
        assert out.wait_for(10)
        # The memory-engine broker comes back empty: no topics, no group, no producer ids.
        services.stop_broker()
        services.start_broker()
        ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=2)
        after = valid_posts(10, prefix="after")
        produce_posts(settings, after)
        wait_until(lambda: {p["id"] for p in after} <= {d["id"] for d in out.documents}, 90)
        assert running.error is None
    assert {p["id"] for p in after} <= {d["id"] for d in out.documents}
    published = read_topic(settings, k.output_topic, expect=10, timeout_s=10)
    assert {p["id"] for p in after} <= set(ids(published))  # on the (new) output topic, not only in the hook
