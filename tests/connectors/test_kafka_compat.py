"""What connectors/kafka_compat.py relies on in kafka-python, pinned: each test fails loudly if an upgrade changes it.

No broker needed: clients built with an explicit ``api_version`` do not connect until used.
"""

from __future__ import annotations

import threading
import time
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import SubscriptionState
from kafka.errors import KafkaTimeoutError

from connectors.kafka_compat import abort_pending_sends, forget_highwater, io_sleep, start_at_committed

NOWHERE = ["127.0.0.1:1"]  # nothing listens there; the tests never need an answer
TP = TopicPartition("posts", 0)


def test_the_pinned_kafka_python_major_version_is_the_one_these_internals_were_checked_against():
    assert version("kafka-python").split(".")[0] == "3", (
        "re-check every function of connectors/kafka_compat.py"
    )


def test_io_sleep_is_awaitable_on_the_consumers_io_loop_and_sleeps():
    consumer = KafkaConsumer(bootstrap_servers=NOWHERE, api_version=(2, 5), group_id="compat")
    try:
        sleep = io_sleep(consumer)

        async def nap() -> float:  # the way the revoke listener waits: on kafka-python's own loop
            started = time.monotonic()
            await sleep(0.05)
            return time.monotonic() - started

        assert consumer._net.run(nap) >= 0.05
    finally:
        consumer.close()


def test_aborting_pending_sends_lets_close_stop_the_producer_thread():
    producer = KafkaProducer(bootstrap_servers=NOWHERE, api_version=(2, 5), client_id="compat-abort")
    assert any(t.name.startswith("compat-abort") for t in threading.enumerate())
    abort_pending_sends(producer)
    producer.close(timeout=2)
    assert not any(t.name.startswith("compat-abort") and t.is_alive() for t in threading.enumerate())


def test_kafka_python_keeps_the_position_and_log_end_of_a_partition_that_stays_assigned_across_a_rebalance():
    # Why start_at_committed exists: a retained partition keeps its position (maybe past records dropped on
    # revoke) and its cached log end (stale if another member consumed it meanwhile). If this starts failing,
    # kafka-python resets them itself and the repair may be unnecessary.
    state = SubscriptionState()
    state.subscribe(topics=["posts"])
    state.assign_from_subscribed([TP, TopicPartition("posts", 1)])
    state.seek(TP, 42)
    state.assignment[TP].highwater = 50
    state.assign_from_subscribed([TP])
    assert state.position(TP).offset == 42
    assert state.assignment[TP].highwater == 50


def test_forget_highwater_clears_what_consumer_highwater_reports():
    consumer = KafkaConsumer(bootstrap_servers=NOWHERE, api_version=(2, 5))
    try:
        consumer.assign([TP])
        consumer._subscription.assignment[TP].highwater = 25  # as a fetch response would have left it
        assert consumer.highwater(TP) == 25
        forget_highwater(consumer, TP)
        assert consumer.highwater(TP) is None
    finally:
        consumer.close()


class PositionedConsumer:
    """A consumer stand-in with a committed offset and a position per partition."""

    def __init__(self, committed: int | str | None, position: int) -> None:
        self._committed, self._position = committed, position
        self._subscription = SimpleNamespace(assignment={})
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.timeouts: list[int | None] = []

    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        self.timeouts.append(timeout_ms)
        if self._committed == "failing":  # a broker that cannot answer OffsetFetch (kafka-python: timeout)
            raise KafkaTimeoutError("OffsetFetch timed out")
        return self._committed

    def beginning_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        self.timeouts.append(timeout_ms)
        return {tp: 0 for tp in tps}

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        self.timeouts.append(timeout_ms)
        return self._position

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


@pytest.mark.parametrize(
    ("committed", "position", "polled_from", "reset", "seek"),
    [
        (10, 14, None, "earliest", 10),  # records past the commit were dropped on revoke: read them again
        (10, 10, None, "earliest", None),  # already there
        (10, 12, 10, "earliest", None),  # the poll that completed the assignment read from the commit on
        (None, 7, None, "earliest", 0),  # nothing committed (e.g. a broker that lost it): from the beginning
        (None, 7, None, "latest", None),  # nothing committed, latest: kafka-python's own reset applies
        ("failing", 7, None, "earliest", None),  # OffsetFetch fails: give up within the bound, no seek
    ],
)
def test_start_at_committed_moves_the_position_to_the_committed_offset(
    committed, position, polled_from, reset, seek
):
    consumer = PositionedConsumer(committed, position)
    polled: dict[TopicPartition, list[Any]] = (
        {TP: [SimpleNamespace(offset=polled_from)]} if polled_from else {}
    )
    moved = start_at_committed(consumer, [TP], polled, reset, 2000)  # type: ignore[arg-type]  # a stand-in consumer
    assert consumer.seeks == ([] if seek is None else [(TP, seek)])
    assert consumer.timeouts and set(consumer.timeouts) == {2000}  # no call may block without a bound
    assert moved == (set() if seek is None else {TP})
