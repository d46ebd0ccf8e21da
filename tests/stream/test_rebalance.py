"""The rebalance handler against a consumer stand-in: the races of a revoke with the consumer loop, made
deterministic (the broker-level rebalance is tests/stream/faults/test_faults_kafka.py's second-worker test)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

from helpers import wait_until
from kafka import TopicPartition
from kafka.future import Future

from connectors.metrics import Metrics
from stream.offsets import Batch, OffsetTracker
from stream.processor import Record
from stream.rebalance import RebalanceHandler

TOPIC = "posts"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


class FakeConsumer:
    """What the handler uses of a KafkaConsumer: the IO loop's sleep and commit_async (recorded, answered at once)."""

    def __init__(self) -> None:
        self._net = SimpleNamespace(sleep=asyncio.sleep)
        self.commits: list[dict[TopicPartition, int]] = []

    def commit_async(self, offsets: dict[TopicPartition, Any]) -> Future:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})
        return Future().success(None)


def handler(revoke_wait_s: float = 10.0) -> tuple[RebalanceHandler, FakeConsumer]:
    h = RebalanceHandler(OffsetTracker(), Metrics(), TOPIC, revoke_wait_s=revoke_wait_s)
    consumer = FakeConsumer()
    h.bind(consumer)  # type: ignore[arg-type]  # a stand-in for KafkaConsumer
    asyncio.run(h.on_partitions_assigned({P0, P1}))
    return h, consumer


def polled(tp: TopicPartition, *offsets: int) -> dict[TopicPartition, list[Any]]:
    messages = [
        SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o, key=None, value=b"{}", timestamp=0)
        for o in offsets
    ]
    return {tp: messages}


def build(records: list[Record]) -> Batch:
    return Batch(1, records, decoding=[], invalid=[], sealed_at=0.0)


def revoke_in_background(h: RebalanceHandler, partitions: set[TopicPartition]) -> threading.Thread:
    """The revoke as kafka-python runs it: on another thread than the consumer loop (here, the test)."""
    thread = threading.Thread(target=asyncio.run, args=(h.on_partitions_revoked(partitions),), daemon=True)
    thread.start()
    return thread


def test_revoke_commits_the_batches_sealed_before_it_and_nothing_read_after_it_is_published():
    h, consumer = handler()
    h.add(polled(P0, 0, 1, 2, 3))
    sealed = h.seal(build)
    assert sealed is not None
    h.add(polled(P0, 4, 5))  # still open when the revoke comes
    revoke = revoke_in_background(h, {P0, P1})
    assert wait_until(lambda: not h.owned(), 5), "the revoked partitions are still readable"
    # The consumer loop goes on meanwhile: records it polled before the revoke are not added, nothing is sealed.
    assert h.add(polled(P0, 6, 7)) == {}
    assert h.seal(build) is None
    assert h.open_state()[0] == 0
    revoke.join(0.3)
    assert revoke.is_alive(), "the revoke returned before the in-flight batch was published"
    sealed.done.set()  # published: now it may be committed
    revoke.join(5)
    assert not revoke.is_alive()
    assert consumer.commits == [{P0: 4}]  # exactly what was published; 4..7 are read again by the next owner
    assert not h.owned()


def test_revoke_waits_for_a_commit_the_consumer_loop_has_in_flight():
    h, consumer = handler()
    with h.committing() as owned:
        assert owned == {P0, P1}
        revoke = revoke_in_background(h, {P0, P1})
        assert wait_until(lambda: not h.owned(), 5)
        revoke.join(0.3)
        assert revoke.is_alive(), "the partitions were handed over while their commit was in flight"
    revoke.join(5)
    assert not revoke.is_alive()
    with h.committing() as owned:
        assert owned == set()  # a commit started after the revoke takes none of the revoked partitions


def test_a_batch_unfinished_at_the_revoke_bound_is_never_committed():
    h, consumer = handler(revoke_wait_s=0.2)
    h.add(polled(P0, 0, 1))
    stuck = h.seal(build)
    assert stuck is not None
    asyncio.run(
        h.on_partitions_revoked({P0, P1})
    )  # returns at its bound: a stuck publish must not hold the group
    stuck.done.set()
    assert consumer.commits == []
    assert h.offsets.take({P0, P1}) == {}  # the next owner reads those records again


def test_lost_partitions_are_dropped_and_nothing_of_them_is_committed():
    h, consumer = handler()
    h.add(polled(P0, 0, 1))
    in_flight = h.seal(build)
    assert in_flight is not None
    h.add(polled(P1, 7))
    asyncio.run(h.on_partitions_lost({P0, P1}))
    in_flight.done.set()
    assert h.open_state()[0] == 0 and not h.owned()
    assert h.offsets.take({P0, P1}) == {} and consumer.commits == []
