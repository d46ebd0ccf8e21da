"""Publishing against a broker that restarts: every record acknowledged or an error, never silently dropped."""

from __future__ import annotations

import threading
import time

import pytest
from stream_support import read_topic, stream_settings

from connectors.kafka import ensure_topics
from connectors.metrics import Metrics
from stream.processor import OutgoingRecord
from stream.publisher import Publisher, PublishError

pytestmark = pytest.mark.services


def records(topic: str, prefix: str, n: int) -> list[OutgoingRecord]:
    return [OutgoingRecord(topic, f"{prefix}{i}".encode(), b"{}", [("h", b"v")]) for i in range(n)]


def test_producer_refused_after_broker_restart_is_recreated_and_nothing_is_lost(services, names):
    settings = stream_settings(services, names, partitions=2, kafka={"produce_timeout_s": 3.0})
    topic = settings.kafka.output_topic
    metrics = Metrics()
    publisher = Publisher(settings.kafka, settings.limits, metrics)
    stopping = threading.Event()
    try:
        publisher.publish(records(topic, "before", 5), stopping)
        # The memory-engine broker forgets every producer id: the idempotent producer is refused from now on.
        services.stop_broker()
        services.start_broker()
        ensure_topics(settings.kafka, [topic], partitions=2)
        publisher.publish(records(topic, "after", 5), stopping)  # returns only once all 5 are acknowledged
    finally:
        publisher.close()
    out = read_topic(settings, topic, expect=5, timeout_s=10)
    assert sorted(r.key for r in out) == sorted(r.key for r in records(topic, "after", 5))
    assert all(r.headers == [("h", b"v")] for r in out)
    assert metrics.producer_recreated_total._value.get() >= 1


def test_publish_gives_up_at_shutdown_with_an_error_when_the_broker_is_gone(services, names):
    settings = stream_settings(services, names, partitions=1, kafka={"produce_timeout_s": 1.0, "request_timeout_ms": 1000})
    metrics = Metrics()
    publisher = Publisher(settings.kafka, settings.limits, metrics)
    stopping = threading.Event()
    try:
        publisher.publish(records(settings.kafka.output_topic, "warm", 1), stopping)
        services.stop_broker()
        stopping.set()
        started = time.monotonic()
        with pytest.raises(PublishError, match="unpublished at shutdown"):
            publisher.publish(records(settings.kafka.output_topic, "lost", 3), stopping)
        assert time.monotonic() - started < 20  # bounded, so SIGTERM during an outage still ends the process
        assert metrics.publish_failures_total._value.get() >= 1
    finally:
        publisher.close(timeout_s=0)
        services.start_broker()
