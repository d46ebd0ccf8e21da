"""Everything that depends on kafka-python's internals or on one broker's quirks, in one place.

The rest of the service uses public kafka-python API only. Each function here says which kafka-python
versions or which broker need it; ``tests/connectors/test_kafka_compat.py`` fails loudly if the pinned
kafka-python (``>=3.0.12,<4``) stops providing what is used, so an upgrade cannot break it silently.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Literal

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

log = logging.getLogger(__name__)

IoSleep = Callable[[float], Awaitable[Any]]


def io_sleep(consumer: KafkaConsumer) -> IoSleep:
    """The consumer's IO-loop sleep, for an ``AsyncConsumerRebalanceListener`` that must wait without blocking.

    kafka-python 3.x runs heartbeats and rebalance callbacks on its own event loop (``consumer._net``, a
    private attribute; 2.x had neither that loop nor async listeners). Awaiting this sleep yields to the
    loop, so heartbeats go on while a revoke waits; ``asyncio.sleep`` or ``time.sleep`` would not.
    """
    sleep: IoSleep = consumer._net.sleep
    return sleep


def abort_pending_sends(producer: KafkaProducer) -> None:
    """Fail every record the producer still holds, so that ``close()`` can stop its I/O thread at once.

    kafka-python (2.x and 3.x) has no public call for this: ``close()`` flushes first and, with records
    still pending, raises before it stops the producer's thread, which would leak a thread and its
    connections at every recreation. ``_sender.force_close()`` is what ``close(timeout=0)`` uses inside.
    """
    producer._sender.force_close()


def start_at_committed(
    consumer: KafkaConsumer,
    partitions: Collection[TopicPartition],
    polled: Mapping[TopicPartition, Sequence[Any]],
    auto_offset_reset: Literal["earliest", "latest"],
    timeout_ms: int,
) -> set[TopicPartition]:
    """After an assignment, start every partition at the group's committed offset; returns those moved.

    kafka-python 3.x keeps the state of a partition that stays assigned across an (eager) rebalance, but
    this member may have read records past the committed offset and dropped them on revoke, or missed a
    generation in which another member consumed the partition. And a broker that lost its data (Tansu's
    memory engine) forgets the commits. So positions must follow the commits, as a fresh assignment's do,
    and the cached log end is forgotten (``forget_highwater``). Blocking calls: run it on the consumer
    loop, never in a listener. ``polled`` is the poll that completed the assignment: its records already
    moved the position.
    """
    moved: set[TopicPartition] = set()
    for tp in partitions:
        forget_highwater(consumer, tp)
        try:  # every call bounded: kafka-python's default is to retry forever, and stop() must still work
            committed = consumer.committed(tp, timeout_ms=timeout_ms)
            if committed is None:
                if auto_offset_reset != "earliest":
                    continue
                committed = consumer.beginning_offsets([tp], timeout_ms=timeout_ms)[tp]
            position = (
                polled[tp][0].offset if polled.get(tp) else consumer.position(tp, timeout_ms=timeout_ms)
            )
        except Exception as exc:
            # Broker unreachable or failing: kafka-python's own offset reset still applies.
            log.debug("cannot verify the position of %s: %s", tp, exc)
            continue
        if position != committed:
            consumer.seek(tp, committed)
            moved.add(tp)
            log.info(
                "partition %s-%d: position %d moved to the committed offset %d",
                tp.topic,
                tp.partition,
                position,
                committed,
                extra={"topic": tp.topic, "partition": tp.partition, "offset": committed},
            )
    return moved


def forget_highwater(consumer: KafkaConsumer, tp: TopicPartition) -> None:
    """Drop the cached log end of a partition, so ``consumer.highwater`` waits for the next fetch response.

    kafka-python 3.x keeps it (``TopicPartitionState.highwater``, private) with the rest of a retained
    partition's state. After a generation this member missed it is stale: below the committed offset
    another member reached, which ``rewind_past_log_end`` would take for a recreated partition and re-read
    it from the start (measured: 39 duplicates in one run of the second-worker test).
    """
    state = consumer._subscription.assignment.get(tp)
    if state is not None:
        state.highwater = None


def rewind_past_log_end(
    consumer: KafkaConsumer,
    tp: TopicPartition,
    position: int,
    highwater: int,
    auto_offset_reset: Literal["earliest", "latest"],
    timeout_ms: int,
) -> None:
    """A position past the log end means the partition was recreated (a broker that lost its data).

    Apache Kafka answers such a fetch with OFFSET_OUT_OF_RANGE and the client resets by itself; Tansu
    (0.6, memory engine) returns nothing, so without this the member would wait at the old position and
    skip the new records. Blocking calls (bounded by ``timeout_ms``; on failure the next loop tries
    again, the position still past the log end): consumer loop only.
    """
    try:
        committed = consumer.committed(tp, timeout_ms=timeout_ms)
    except Exception as exc:  # broker unreachable or failing: retried at the next loop
        log.debug("cannot read the committed offset of %s: %s", tp, exc)
        return
    if committed is not None and committed <= highwater:
        consumer.seek(tp, committed)
        target: object = committed
    elif auto_offset_reset == "earliest":
        consumer.seek_to_beginning(tp)
        target = auto_offset_reset
    else:
        consumer.seek_to_end(tp)
        target = auto_offset_reset
    log.warning(
        "partition %s-%d: position %d is past the log end %d (topic recreated?); rewound to %s",
        tp.topic,
        tp.partition,
        position,
        highwater,
        target,
    )
