"""The offset tracker: what may be committed, in batch order, and never backwards (no broker needed)."""

from __future__ import annotations

import pytest
from kafka import TopicPartition

from stream.offsets import Batch, InvalidStoredOffset, OffsetTracker
from stream.processor import Record

P0, P1 = TopicPartition("posts", 0), TopicPartition("posts", 1)


def batch(seq: int, *where: tuple[int, int]) -> Batch:
    """A batch holding one record per (partition, offset)."""
    records = [Record("posts", partition, offset, None, b"{}", 0) for partition, offset in where]
    return Batch(seq, records, decoding=[], invalid=[], sealed_at=0.0)


def finish(b: Batch, error: BaseException | None = None) -> Batch:
    b.error = error
    b.done.set()
    return b


def test_finished_batches_yield_next_offsets_in_seal_order_only():
    tracker = OffsetTracker()
    first, second = batch(1, (0, 10), (0, 11), (1, 5)), batch(2, (0, 12))
    tracker.add(first)
    tracker.add(second)
    finish(second)
    assert tracker.take({P0, P1}) == {}  # the second waits for the first: committing it would skip 10..11
    finish(first)
    assert tracker.take({P0, P1}) == {P0: 13, P1: 6}  # last offset + 1, the later batch's where both have one
    assert len(tracker) == 0


def test_only_the_partitions_asked_for_are_taken_the_rest_waits():
    tracker = OffsetTracker()
    tracker.add(finish(batch(1, (0, 3), (1, 7))))
    assert tracker.take({P1}) == {P1: 8}
    assert tracker.take({P0, P1}) == {P0: 4}


def test_a_failed_batch_blocks_every_later_commit():
    tracker = OffsetTracker()
    tracker.add(finish(batch(1, (0, 1)), RuntimeError("model failed")))
    tracker.add(finish(batch(2, (0, 2))))
    assert tracker.take({P0}) == {}
    assert len(tracker) == 2


def test_an_offset_below_one_already_stored_is_refused():
    tracker = OffsetTracker()
    tracker.add(finish(batch(1, (0, 20))))
    assert tracker.take({P0}) == {P0: 21}
    tracker.add(finish(batch(2, (0, 5))))  # the partition was re-read from an earlier position without notice
    with pytest.raises(InvalidStoredOffset, match="posts-0: next offset 6 is below the stored 21"):
        tracker.take({P0})


def test_excluded_partitions_are_never_committed_from_what_is_in_hand_and_may_restart_lower():
    tracker = OffsetTracker()
    tracker.add(finish(batch(1, (0, 20), (1, 3))))
    in_flight = batch(2, (0, 21), (1, 4))
    tracker.add(in_flight)
    tracker.exclude({P0})  # lost, revoked, or rewound
    finish(in_flight)
    assert tracker.take({P0, P1}) == {P1: 5}
    tracker.add(finish(batch(3, (0, 0))))  # the partition starts again from its committed offset (here: 0)
    assert tracker.take({P0}) == {P0: 1}
