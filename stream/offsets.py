"""Sealed batches in flight, and the offsets their completion allows to commit.

Shared by the consumer loop (adds batches, commits), the model thread (finishes them) and the rebalance
handler (waits for them, commits on revoke, excludes lost partitions), so every method is atomic under
one lock: recording a finished batch and taking its offsets happen in batch order whoever calls.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kafka import TopicPartition

from core.contracts import Invalid
from stream.processor import DecodedPost, Record

if TYPE_CHECKING:
    from core.inference import PreparedBatch


class InvalidStoredOffset(RuntimeError):
    """A next-offset lower than one already stored for its partition (as Quix Streams' error of that name).

    Committing it would move the group backwards and replay what was published; it means a bug, or a
    partition whose position was moved without telling the tracker (``exclude``).
    """


@dataclass
class Batch:
    """A sealed batch: its records, their validation results, decode and prepare futures, and its completion state."""

    seq: int
    records: list[Record]
    decoding: list[Future[DecodedPost]]
    invalid: list[tuple[Record, Invalid]]
    sealed_at: float
    #: The model input of the decoded posts, built in the decode pool after them (None when none is valid).
    preparing: Future[tuple[PreparedBatch, float]] | None = None  # with the monotonic time it was ready
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    #: Partitions lost or revoked while the batch was in flight: their offsets must not be committed.
    excluded: set[TopicPartition] = field(default_factory=set)

    def next_offsets(self) -> dict[TopicPartition, int]:
        """Last offset + 1 per partition (the offset to commit), without the excluded partitions."""
        offsets: dict[TopicPartition, int] = {}
        for r in self.records:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in self.excluded:
                offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        return offsets


class OffsetTracker:
    """Batches in seal order; finished ones become next-offsets per partition until they are taken to commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: deque[Batch] = deque()
        self._pending: dict[TopicPartition, int] = {}  # finished, not yet taken for a commit
        self._stored: dict[TopicPartition, int] = {}  # the highest next-offset ever stored, per partition

    def __len__(self) -> int:
        """Batches sealed and not yet recorded as finished (the pipeline's depth)."""
        with self._lock:
            return len(self._batches)

    def add(self, batch: Batch) -> None:
        with self._lock:
            self._batches.append(batch)

    def in_flight(self) -> list[Batch]:
        with self._lock:
            return list(self._batches)

    def take(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        """Record the batches finished at the head, in order, then pop the next-offsets of ``partitions``.

        A batch waits for every earlier one, and one that failed is never recorded: nothing past it is
        committed. Raises InvalidStoredOffset rather than store an offset below one stored before.
        """
        with self._lock:
            while self._batches and self._batches[0].done.is_set() and self._batches[0].error is None:
                self._store(self._batches.popleft().next_offsets())
            return {tp: self._pending.pop(tp) for tp in list(self._pending) if tp in partitions}

    def _store(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            stored = self._stored.get(tp)
            if stored is not None and offset < stored:
                raise InvalidStoredOffset(
                    f"partition {tp.topic}-{tp.partition}: next offset {offset} is below the stored {stored}"
                )
        for tp, offset in offsets.items():
            self._stored[tp] = self._pending[tp] = offset

    def exclude(self, partitions: Collection[TopicPartition]) -> None:
        """Never commit these partitions' offsets from what is in hand (ownership ended or position moved)."""
        with self._lock:
            for batch in self._batches:
                batch.excluded |= set(partitions)
            for tp in partitions:
                self._pending.pop(tp, None)
                self._stored.pop(tp, None)
