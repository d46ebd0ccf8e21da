"""Publishing against a broker that restarts, and records it refuses: every record acknowledged or an error,
never silently dropped; retried only while a retry can succeed."""

from __future__ import annotations

import threading
import time

import pytest
from kafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from stream_support import read_topic, stream_settings

from connectors.kafka import ensure_topics
from connectors.metrics import Metrics
from stream.processor import OutgoingRecord
from stream.publisher import Publisher, PublishError, UnpublishableError
from stream.settings import load_settings

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
    assert metrics.registry.get_sample_value("postsense_producer_recreated_total") >= 1


def test_publish_gives_up_at_shutdown_with_an_error_when_the_broker_is_gone(services, names):
    settings = stream_settings(
        services, names, partitions=1, kafka={"produce_timeout_s": 1.0, "request_timeout_ms": 1000}
    )
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
        assert metrics.registry.get_sample_value("postsense_publish_failures_total") >= 1
    finally:
        publisher.close(timeout_s=0)
        services.start_broker()


def test_a_record_larger_than_the_producer_may_send_fails_the_batch_at_once(services, names):
    settings = stream_settings(services, names, partitions=1, limits={"max_record_bytes": 1024})
    metrics = Metrics()
    publisher = Publisher(settings.kafka, settings.limits, metrics)
    huge = OutgoingRecord(settings.kafka.output_topic, b"huge", b"x" * 200_000, [])
    started = time.monotonic()
    try:
        with pytest.raises(UnpublishableError, match="not retrying: MessageSizeTooLargeError"):
            publisher.publish(
                [huge], threading.Event()
            )  # the service is running: only a hopeless error ends this
    finally:
        publisher.close()
    assert time.monotonic() - started < 5  # not a retry loop
    assert metrics.registry.get_sample_value("postsense_publish_failures_total") == 1


class Sent:
    """A send's future, resolved: ``get`` raises the send's error, if any."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class RefusingProducer:
    """A producer stand-in whose sends fail with ``errors`` in turn (then succeed); counts the attempts."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.sends = 0

    def send(self, topic: str, **_: object) -> Sent:
        self.sends += 1
        return Sent(self.errors.pop(0) if self.errors else None)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.mark.parametrize(
    ("errors", "outcome", "sends"),
    [
        ([KafkaConnectionError("reset")], None, 2),  # retriable: sent again, acknowledged
        ([TopicAuthorizationFailedError()], UnpublishableError, 1),  # never retried
        ([KafkaConnectionError("reset"), TopicAuthorizationFailedError()], UnpublishableError, 2),
    ],
)
def test_only_errors_a_retry_can_cure_are_retried(errors, outcome, sends):
    producer = RefusingProducer(*errors)
    settings = load_settings(None, {"kafka": {"produce_timeout_s": 1.0}})
    publisher = Publisher(settings.kafka, settings.limits, Metrics(), producer_factory=lambda: producer)
    if outcome is None:
        publisher.publish(records("out", "r", 1), threading.Event())
    else:
        with pytest.raises(outcome, match="not retrying"):
            publisher.publish(records("out", "r", 1), threading.Event())
    assert producer.sends == sends
