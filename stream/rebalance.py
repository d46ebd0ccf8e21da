"""Partition ownership and the open (unsealed) batch, changed by rebalances and by the consumer loop alike.

kafka-python 3.x calls the listener on its IO thread while the consumer loop runs on another, so the
assigned set, the partitions being revoked and the open records sit behind one lock. The lock is
never held across an ``await`` (the IO loop must keep heartbeating) nor around a blocking consumer call.

A graceful (revoke) rebalance publishes nothing twice: the revoke first stops the revoked partitions
from being read or sealed (their open records are dropped, and a seal is atomic with that), then waits
for every batch sealed before it and for a commit the consumer loop has in flight, commits what
finished, and only then hands the partitions over. Records of revoked partitions that kafka-python had
already fetched are dropped too; whoever owns the partition next starts at the committed offset
(``kafka_compat.start_at_committed``). Lost partitions (eviction) are never committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from connectors.kafka_compat import IoSleep, io_sleep
from connectors.metrics import Metrics
from stream.offsets import Batch, OffsetTracker
from stream.processor import Record

log = logging.getLogger(__name__)

#: How often a waiting revoke looks at the batches again (it yields to the IO loop in between).
REVOKE_POLL_S = 0.02


def _tp(record: Record) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


class RebalanceHandler(AsyncConsumerRebalanceListener):
    """Revoke, assign and lost; the assigned partitions; the open batch. ``bind`` it to the consumer first."""

    def __init__(self, offsets: OffsetTracker, metrics: Metrics, topic: str, revoke_wait_s: float) -> None:
        self.offsets = offsets
        self.metrics = metrics
        self.topic = topic
        #: Bound on a revoke's wait: a stuck publish must not hold the whole group.
        self.revoke_wait_s = revoke_wait_s
        self._lock = threading.Lock()
        self._assigned: set[TopicPartition] = set()
        self._revoking: set[TopicPartition] = set()
        self._unverified: set[TopicPartition] = set()  # assigned, position not yet checked against the commit
        self._open: list[Record] = []
        self._open_since = 0.0
        self._commits_in_flight = 0
        self._consumer: KafkaConsumer | None = None
        self._sleep: IoSleep | None = None

    def bind(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer
        self._sleep = io_sleep(consumer)

    # --- the consumer loop's side -------------------------------------------------------------------

    def owned(self) -> frozenset[TopicPartition]:
        """Assigned partitions not being revoked: the ones whose records may be read, sealed and committed."""
        with self._lock:
            return frozenset(self._assigned - self._revoking)

    def open_state(self) -> tuple[int, float]:
        """How many records wait in the open batch, and since when (monotonic time of the first)."""
        with self._lock:
            return len(self._open), self._open_since

    def take_unverified(self) -> set[TopicPartition]:
        with self._lock:
            partitions, self._unverified = self._unverified & self._assigned, set()
            return partitions

    def add(self, polled: Mapping[TopicPartition, Sequence[Any]]) -> dict[str, int]:
        """Append polled records of owned partitions to the open batch; returns the count added per topic."""
        added: dict[str, int] = {}
        with self._lock:
            owned = self._assigned - self._revoking
            for tp, messages in polled.items():
                if tp not in owned or not messages:
                    continue  # revoked meanwhile: the next owner reads it from the committed offset
                if not self._open:
                    self._open_since = time.monotonic()
                self._open.extend(
                    Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp) for m in messages
                )
                added[tp.topic] = added.get(tp.topic, 0) + len(messages)
        return added

    def seal(self, build: Callable[[list[Record]], Batch]) -> Batch | None:
        """Turn the open records into a batch and put it in flight, atomically with respect to a revoke.

        ``build`` validates and starts decoding; it runs under the lock (quick, and it must not call the
        consumer), so a revoke either sees the batch in flight and waits for it, or finds its records
        still open and drops them.
        """
        with self._lock:
            if not self._open:
                return None
            records, self._open = self._open, []
            batch = build(records)
            self.offsets.add(batch)
            return batch

    def drop(self, partitions: set[TopicPartition]) -> None:
        """Forget what is in hand of partitions whose position moved: open records and uncommitted offsets."""
        with self._lock:
            self._open = [r for r in self._open if _tp(r) not in partitions]
            self.offsets.exclude(partitions)

    @contextmanager
    def committing(self) -> Iterator[frozenset[TopicPartition]]:
        """Around a commit on the consumer loop: yields the partitions it may commit; a revoke waits for it."""
        with self._lock:
            self._commits_in_flight += 1
            owned = frozenset(self._assigned - self._revoking)
        try:
            yield owned
        finally:
            with self._lock:
                self._commits_in_flight -= 1

    def clear(self) -> None:
        with self._lock:
            self._assigned.clear()
            self._revoking.clear()
            self._unverified.clear()

    # --- rebalance callbacks (kafka-python's IO thread: never a blocking consumer call) -------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.metrics.record_rebalance("revoked")
        with self._lock:
            self._revoking |= revoked
            self._open = [r for r in self._open if _tp(r) not in revoked]
            waiting = self.offsets.in_flight()  # every batch that can hold records of the revoked partitions
        deadline = time.monotonic() + self.revoke_wait_s
        while not self._settled(waiting) and time.monotonic() < deadline:
            await self._io_sleep(REVOKE_POLL_S)
        offsets = self.offsets.take(revoked)
        if offsets:
            await self._commit(offsets, deadline)
        with self._lock:
            # Whatever did not finish in time is not committed: the next owner reads it again.
            self.offsets.exclude(revoked)
            self._assigned -= revoked
            self._revoking -= revoked

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.metrics.record_rebalance("assigned")
        with self._lock:
            self._assigned |= assigned
            self._unverified |= assigned
        partitions = sorted(tp.partition for tp in assigned)
        log.info(
            "assigned %d partitions: %s",
            len(assigned),
            ",".join(map(str, partitions)),
            extra={"topic": self.topic, "partitions": partitions},
        )

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.metrics.record_rebalance("lost")
        log.warning(
            "lost %d partitions (evicted); nothing is committed for them",
            len(lost),
            extra={"topic": self.topic, "partitions": sorted(tp.partition for tp in lost)},
        )
        with self._lock:
            self._open = [r for r in self._open if _tp(r) not in lost]
            self.offsets.exclude(lost)
            self._assigned -= lost
            self._revoking -= lost

    def _settled(self, waiting: list[Batch]) -> bool:
        with self._lock:
            return self._commits_in_flight == 0 and all(b.done.is_set() for b in waiting)

    async def _io_sleep(self, seconds: float) -> None:
        assert self._sleep is not None, "bind() the handler to its consumer first"
        await self._sleep(seconds)

    async def _commit(self, offsets: dict[TopicPartition, int], deadline: float) -> None:
        """Commit without blocking the IO loop (``commit_async``, then yield until it is answered)."""
        assert self._consumer is not None
        future = self._consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        while not future.is_done and time.monotonic() < deadline:
            await self._io_sleep(REVOKE_POLL_S / 2)
        if not future.succeeded():
            log.warning("commit on revoke failed, those records will be redelivered: %s", future.exception)
