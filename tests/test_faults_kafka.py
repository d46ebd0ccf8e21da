"""Kafka faults against real brokers, every post counted in and out.

Covered elsewhere and not repeated here: kill -9 and restart of the worker process and SIGTERM drains
(test_stream_cli.py), a graceful stop and restart, a second member joining, a batch slower than
max.poll.interval.ms (test_stream_service.py), publisher-level producer recreation (test_stream_publisher.py).
Faults that restart a broker use a broker of the test's own, never the session's.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any

import pytest
from helpers import Broker, Endpoints, S3Server, as_client, proxied_broker, report_counts, wait_until
from test_stream_support import (
    LABELS,
    Collector,
    Running,
    produce_posts,
    read_topic,
    stream_settings,
    valid_posts,
    wait_committed,
)

from connectors.kafka import committed_offsets, ensure_topics
from connectors.metrics import Metrics
from core.inference import Predictor
from core.model import create_model
from stream.runtime import Service
from stream.settings import Settings

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_model(create_model("tiny", labels=LABELS))


def merge_ends(ends: dict[int, int], more: dict[int, int]) -> dict[int, int]:
    return {p: max(ends.get(p, 0), more.get(p, 0)) for p in ends.keys() | more.keys()}


def out_ids(settings: Settings, expect: int, timeout_s: float = 30.0) -> list[str]:
    """Post ids of the sentiment records on the output topic (the record key is the post id)."""
    records = read_topic(settings, settings.kafka.output_topic, expect=expect, timeout_s=timeout_s)
    for r in records:
        assert json.loads(r.value)["id"] == r.key.decode()  # consumers can deduplicate on the key
    return [r.key.decode() for r in records]


def worker_threads(client_id: str) -> list[str]:
    """Live kafka-python I/O threads of a client id (they are named after it)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(client_id)]


def test_produce_failing_commits_nothing_past_what_was_published_and_recovers(services, names, predictor,
                                                                               tmp_path, caplog):
    broker, proxy = proxied_broker(tmp_path / "broker")
    try:
        settings = stream_settings(
            Endpoints(broker.bootstrap, services.redis_url), names, partitions=2,
            kafka={"produce_timeout_s": 2.0, "request_timeout_ms": 1500, "client_id": "postsense-worker"},
        )
        feeder = as_client(settings, "feeder")  # the test's own producer is never refused
        posts = valid_posts(40, "f")
        first_ends = produce_posts(feeder, posts[:16])
        metrics = Metrics()
        caplog.set_level(logging.INFO, logger="stream.publisher")
        with Running(Service(settings, predictor, metrics=metrics)) as running:
            assert wait_committed(settings, first_ends) == first_ends
            published_before = len(out_ids(settings, expect=16))

            proxy.refuse_produce_from = "postsense-worker"  # the output and dead-letter topics are now unreachable
            ends = merge_ends(first_ends, produce_posts(feeder, posts[16:]))
            assert wait_until(lambda: metrics.publish_failures_total._value.get() >= 1, 20)
            time.sleep(8)  # several produce timeouts and retries: the producer is recreated at the third
            during = out_ids(settings, expect=10**6, timeout_s=2)
            committed_during = committed_offsets(settings.kafka, settings.kafka.input_topic)
            assert running.thread.is_alive() and running.error is None  # retrying, not crashed

            proxy.refuse_produce_from = None
            assert wait_committed(settings, ends, timeout_s=60) == ends
            final = out_ids(settings, expect=len(posts))
        refused = proxy.refused
        # Every producer the publisher gave up on was closed, not left retrying on its own I/O thread.
        assert wait_until(lambda: not worker_threads("postsense-worker"), 10), worker_threads("postsense-worker")
    finally:
        proxy.stop()
        broker.stop()
    counts = report_counts("produce refused then restored", [p["id"] for p in posts], final)
    assert published_before == 16
    assert len(during) == 16, "something was published while the output topic was unreachable"
    # Nothing past what was published is committed: the offsets stayed where the first 16 posts left them.
    assert committed_during == first_ends
    assert refused > 0
    assert metrics.producer_recreated_total._value.get() >= 1
    assert counts["lost"] == 0 and counts["unexpected"] == 0
    assert counts["duplicated"] <= (settings.batch.max_inflight_batches + 1) * settings.batch.max_posts
    assert any("publishing failed" in r.getMessage() for r in caplog.records)
    assert any("publishing recovered" in r.getMessage() for r in caplog.records)
