"""How batches are fed, published and committed: the consumer-group loop of ``postsense serve``.

Threads: the *consumer loop* (the thread that calls ``Service.run``) owns the KafkaConsumer and
validates records (cheap, and the circuit breaker must count them in order); a pool of *decode* threads
decodes images and normalises texts; one *model* thread runs inference and publishing, batch after
batch, so decoding batch N+1 overlaps inference of batch N.

The commit protocol, in one place (``Service._loop``):

1. Commit every batch the model thread has finished, in order, as explicit next-offsets
   (last offset + 1 per partition). A batch is finished only when every output and dead-letter record
   of it was acknowledged by the broker (each send's future checked).
2. Back-pressure: with ``batch.max_inflight_batches`` batches in the pipeline, pause every assigned
   partition (also ones assigned meanwhile); otherwise resume. Polling goes on either way, so the
   member stays in the group however slow the model is.
3. Poll (bounded by the open batch's remaining wait).
4. Seal the open batch when it holds ``batch.max_posts`` records or its first record waited
   ``batch.max_wait_ms``: validate each record (invalid → dead letter, counted by the circuit breaker),
   submit the valid ones to the decode pool, hand the batch to the model thread.

Rebalance (a listener on the consumer's IO thread, which must not block on the consumer): on revoke it
waits, yielding to the IO loop so heartbeats continue (``await`` on kafka-python's own loop sleep, a
private attribute of kafka-python 3.x, pinned <4), until the pipeline is empty, commits what finished
(``commit_async``) and drops the open batch's records; so a graceful rebalance publishes nothing twice. On lost (evicted) nothing is committed for those partitions. Shutdown (``stop()``, SIGTERM):
the open batch is sealed and finished, everything is published and committed, the consumer leaves the
group, exit 0.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from connectors.kafka import make_consumer
from connectors.metrics import Metrics
from core.contracts import Invalid, Post
from stream.breaker import CircuitBreakerOpen, DeadLetterBreaker
from stream.processor import BatchProcessor, DecodedPost, Record, ReferenceQueuesLike, validate
from stream.publisher import Publisher
from stream.settings import Settings

if TYPE_CHECKING:
    from core.inference import Predictor

log = logging.getLogger(__name__)

OutputHook = Callable[[list[dict[str, Any]]], None]

#: Poll timeout while nothing is waiting to be sealed (bounds how fast stop() and pause changes act).
IDLE_POLL_MS = 200
#: Poll timeout while partitions are paused: short, the loop only keeps the membership alive.
PAUSED_POLL_MS = 50


class ServiceError(RuntimeError):
    """The model thread failed on a batch; nothing of that batch was committed."""


@dataclass
class Batch:
    """A sealed batch: its records, their validation results and decode futures, and its completion state."""

    seq: int
    records: list[Record]
    decoding: list[Future[tuple[DecodedPost, float]]]  # each post with the monotonic time its decode ended
    invalid: list[tuple[Record, Invalid]]
    sealed_at: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    #: Partitions lost while the batch was in flight: their offsets must not be committed.
    excluded: set[TopicPartition] = field(default_factory=set)

    def next_offsets(self) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = {}
        for r in self.records:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in self.excluded:
                offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        return offsets


class Pipeline:
    """Sealed batches in order, shared by the consumer loop, the model thread and the rebalance listener."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: deque[Batch] = deque()

    def __len__(self) -> int:
        with self._lock:
            return len(self._batches)

    def add(self, batch: Batch) -> None:
        with self._lock:
            self._batches.append(batch)

    def take_finished(self) -> list[Batch]:
        """Pop the batches finished without error at the head, in order (a batch waits for every earlier one)."""
        out = []
        with self._lock:
            while self._batches and self._batches[0].done.is_set() and self._batches[0].error is None:
                out.append(self._batches.popleft())
        return out

    def all_done(self) -> bool:
        with self._lock:
            return all(b.done.is_set() for b in self._batches)

    def exclude(self, partitions: set[TopicPartition]) -> None:
        with self._lock:
            for batch in self._batches:
                batch.excluded |= partitions


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance callbacks. They run on kafka-python's IO thread, so they never call a blocking consumer API."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.service._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.service._on_assigned(assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.service._on_lost(lost)


class Service:
    """The ``serve`` loop, callable in-process: ``Service(settings, predictor).run()`` until ``stop()``.

    ``on_output`` is called on the model thread with each published batch's sentiment documents (the
    demo shows them live); it must be quick and must not raise (an exception is logged and ignored).
    """

    def __init__(
        self,
        settings: Settings,
        predictor: Predictor,
        *,
        metrics: Metrics | None = None,
        queues: ReferenceQueuesLike | None = None,
        on_output: OutputHook | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.processor = BatchProcessor(settings, predictor, self.metrics, queues)
        self.publisher = Publisher(settings.kafka, settings.limits, self.metrics)
        self.breaker = DeadLetterBreaker(settings.dead_letter)
        self.on_output = on_output
        self.pipeline = Pipeline()
        self._stopping = threading.Event()
        self._work: queue.Queue[Batch | None] = queue.Queue()
        self._open: list[Record] = []
        self._open_since = 0.0
        self._seq = 0
        self._paused = False
        self._assigned: set[TopicPartition] = set()
        #: Assigned partitions whose position is not yet checked against the committed offset.
        self._unverified: set[TopicPartition] = set()
        self._consumer: KafkaConsumer | None = None
        self._net_sleep: Callable[[float], Any] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._failure: BaseException | None = None
        self.last_poll = time.monotonic()

    # --- public -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the batches in hand, commit and return (thread- and signal-safe)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def ready(self) -> bool:
        """Model loaded (it is, once constructed) and partitions assigned: the /readyz check."""
        return bool(self._assigned) and not self.stopping

    def run(self) -> None:
        """Consume until stop(); raises CircuitBreakerOpen or ServiceError on a fatal condition.

        Either way the batches finished before the failure are committed and the consumer leaves the group.
        """
        kafka = self.settings.kafka
        self._consumer = make_consumer(kafka, self.settings.batch.max_posts)
        self._net_sleep = self._consumer._net.sleep  # the IO loop's awaitable sleep, for the async listener
        self._pool = ThreadPoolExecutor(self.settings.batch.decode_workers, thread_name_prefix="decode")
        model_thread = threading.Thread(target=self._model_loop, name="model", daemon=True)
        model_thread.start()
        self._consumer.subscribe([kafka.input_topic], listener=_Listener(self))
        log.info("consuming %s as group %s", kafka.input_topic, kafka.group_id,
                 extra={"topic": kafka.input_topic, "group_id": kafka.group_id})
        try:
            self._loop()
        finally:
            self._work.put(None)
            self._stopping.set()
            model_thread.join(timeout=self.settings.kafka.produce_timeout_s * 2 + 5)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._close_consumer()
            self.publisher.close()
            log.info("stopped")

    # --- the consumer loop --------------------------------------------------------------------

    def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping.is_set():
                self._raise_failure()
                self._commit_finished()  # 1
                self._apply_backpressure()  # 2
                timeout = PAUSED_POLL_MS if self._paused else self._poll_timeout_ms()
                polled = consumer.poll(timeout_ms=timeout, max_records=self._room())  # 3
                self.last_poll = time.monotonic()
                if self._unverified:
                    rewound = self._verify_positions(polled)
                    polled = {tp: msgs for tp, msgs in polled.items() if tp not in rewound}
                self._add_polled(polled)
                self._update_lag()
                if self._should_seal():  # 4
                    self._seal()
            self._seal()  # shutdown: the batch in hand is finished, not dropped
            self._drain()
        except CircuitBreakerOpen as exc:
            self.metrics.circuit_breaker_open.set(1)
            log.error("%s", exc)
            self._drain()
            raise

    def _room(self) -> int:
        return max(1, self.settings.batch.max_posts - len(self._open))

    def _poll_timeout_ms(self) -> int:
        if not self._open:
            return IDLE_POLL_MS
        remaining = self._open_since + self.settings.batch.max_wait_ms / 1000 - time.monotonic()
        return max(0, int(remaining * 1000))

    def _add_polled(self, polled: dict[TopicPartition, list[Any]]) -> None:
        if not polled:
            return
        if not self._open:
            self._open_since = time.monotonic()
        for tp, messages in polled.items():
            self.metrics.posts_consumed_total.labels(topic=tp.topic).inc(len(messages))
            self._open.extend(
                Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp) for m in messages
            )

    def _should_seal(self) -> bool:
        if not self._open or len(self.pipeline) >= self.settings.batch.max_inflight_batches:
            return False
        waited = time.monotonic() - self._open_since
        return len(self._open) >= self.settings.batch.max_posts or waited * 1000 >= self.settings.batch.max_wait_ms

    def _seal(self) -> None:
        """Validate the open records, start decoding the valid ones, hand the batch to the model thread."""
        if not self._open:
            return
        records, self._open = self._open, []
        started = time.monotonic()
        valid: list[tuple[Record, Post]] = []
        invalid: list[tuple[Record, Invalid]] = []
        for record in records:
            parsed = validate(record, self.processor.limits)
            if isinstance(parsed, Invalid):
                invalid.append((record, parsed))
            else:
                valid.append((record, parsed))
            self.breaker.record(not isinstance(parsed, Invalid))  # raises before anything of it is published
        assert self._pool is not None
        decoding = [self._pool.submit(self._decode_timed, record, post) for record, post in valid]
        self._seq += 1
        batch = Batch(self._seq, records, decoding, invalid, sealed_at=started)
        self.pipeline.add(batch)
        self._work.put(batch)

    def _commit_finished(self) -> None:
        """Step 1: commit the finished batches' next-offsets (blocking; the consumer loop's own thread)."""
        offsets = self._finished_offsets()
        if not offsets:
            return
        assert self._consumer is not None
        started = time.perf_counter()
        try:
            self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except Exception as exc:  # noqa: BLE001 (membership changed: the records will be redelivered)
            log.warning("commit failed, those records will be redelivered: %s: %s", type(exc).__name__, exc)
            return
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise ServiceError(f"the model thread failed: {type(self._failure).__name__}: {self._failure}") from (
                self._failure
            )

    def _finished_offsets(self) -> dict[TopicPartition, int]:
        """Next-offsets of the batches finished so far, for partitions still assigned."""
        offsets: dict[TopicPartition, int] = {}
        for batch in self.pipeline.take_finished():
            for tp, offset in batch.next_offsets().items():
                offsets[tp] = max(offsets.get(tp, 0), offset)
        return {tp: o for tp, o in offsets.items() if tp in self._assigned}

    def _apply_backpressure(self) -> None:
        """Step 2: pause every assigned partition while the pipeline is full; resume when it has room."""
        assert self._consumer is not None
        full = len(self.pipeline) >= self.settings.batch.max_inflight_batches
        if full:
            unpaused = self._consumer.assignment() - self._consumer.paused()
            if unpaused:  # also partitions assigned by a rebalance since the last pause
                self._consumer.pause(*unpaused)
        elif self._paused:
            self._consumer.resume(*self._consumer.paused())
        if full != self._paused:
            self._paused = full
            self.metrics.paused.set(int(full))
            # DEBUG: under a backlog this flips with every batch (normal operation); the paused gauge shows it.
            log.debug("%s partitions (pipeline %s)", "paused" if full else "resumed", "full" if full else "has room")

    def _update_lag(self) -> None:
        assert self._consumer is not None
        lag: dict[tuple[str, int], int] = {}
        for tp in list(self._assigned):
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            position = self._consumer.position(tp)
            if position > highwater:
                self._rewind(tp, position, highwater)
                continue
            lag[(tp.topic, tp.partition)] = highwater - position
        self.metrics.set_consumer_lag(lag)

    def _verify_positions(self, polled: dict[TopicPartition, list[Any]]) -> set[TopicPartition]:
        """After an assignment, start every partition at the group's committed offset; returns those moved.

        kafka-python 3.x keeps the position of a partition that stays assigned across a rebalance, but this
        member may hold records past the committed offset that it dropped on revoke, and a broker that lost
        its data (Tansu's memory engine) forgets the commits: positions must follow the commits, as a fresh
        assignment's do. Runs on the consumer loop (blocking calls are allowed here, not in the listener).
        """
        assert self._consumer is not None
        partitions, self._unverified = self._unverified & self._assigned, set()
        moved: set[TopicPartition] = set()
        for tp in partitions:
            try:
                committed = self._consumer.committed(tp)
                if committed is None:
                    if self.settings.kafka.auto_offset_reset != "earliest":
                        continue
                    committed = self._consumer.beginning_offsets([tp])[tp]
                # Where this poll started reading the partition: records it returned already moved the position.
                position = polled[tp][0].offset if polled.get(tp) else self._consumer.position(tp)
            except Exception as exc:  # noqa: BLE001 (broker unreachable: kafka-python's own reset still applies)
                log.debug("cannot verify the position of %s: %s", tp, exc)
                continue
            if position != committed:
                self._consumer.seek(tp, committed)
                moved.add(tp)
                log.info("partition %s-%d: position %d moved to the committed offset %d", tp.topic, tp.partition,
                         position, committed, extra={"topic": tp.topic, "partition": tp.partition, "offset": committed})
        return moved

    def _rewind(self, tp: TopicPartition, position: int, highwater: int) -> None:
        """A position past the log end means the partition was recreated (a broker that lost its data).

        Kafka answers such a fetch with OFFSET_OUT_OF_RANGE and the client resets by itself; Tansu returns
        nothing, so without this the member would wait at the old position and skip the new records.
        """
        assert self._consumer is not None
        committed = self._consumer.committed(tp)
        if committed is not None and committed <= highwater:
            self._consumer.seek(tp, committed)
        elif self.settings.kafka.auto_offset_reset == "earliest":
            self._consumer.seek_to_beginning(tp)
        else:
            self._consumer.seek_to_end(tp)
        log.warning(
            "partition %s-%d: position %d is past the log end %d (topic recreated?); rewound to %s",
            tp.topic, tp.partition, position, highwater,
            committed if committed is not None and committed <= highwater else self.settings.kafka.auto_offset_reset,
        )

    def _drain(self) -> None:
        """Finish every batch in the pipeline and commit it, polling (paused) so the member stays in the group."""
        assert self._consumer is not None
        deadline = time.monotonic() + self.settings.kafka.max_poll_interval_ms / 1000
        while len(self.pipeline) and time.monotonic() < deadline:
            self._raise_failure()
            self._commit_finished()
            if not len(self.pipeline):
                break
            if not self._consumer.paused() and self._consumer.assignment():
                self._consumer.pause(*self._consumer.assignment())
            self._consumer.poll(timeout_ms=PAUSED_POLL_MS)
        self._commit_finished()

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception as exc:  # noqa: BLE001 (closing must not mask why the loop ended)
                log.debug("closing the consumer: %s", exc)
            self._consumer = None
            self._assigned = set()
            self.metrics.set_consumer_lag({})

    # --- rebalance callbacks (IO thread) --------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.metrics.record_rebalance("revoked")
        # Wait for the in-flight batches, yielding to the IO loop (heartbeats go on), then commit them
        # while this member still owns the partitions. Bounded: a stuck publish must not hold the group.
        deadline = time.monotonic() + self.settings.kafka.session_timeout_ms / 1000
        while not self.pipeline.all_done() and time.monotonic() < deadline:
            await self._net_sleep(0.02)
        offsets = {tp: o for tp, o in self._finished_offsets().items() if tp in revoked}
        if offsets and self._consumer is not None:
            future = self._consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            while not future.is_done and time.monotonic() < deadline:
                await self._net_sleep(0.01)
            if not future.succeeded():
                log.warning("commit on revoke failed, those records will be redelivered: %s", future.exception)
        # The open batch's records are re-read from the committed offsets by whoever owns them next.
        self._open = [r for r in self._open if TopicPartition(r.topic, r.partition) not in revoked]
        self._assigned -= revoked
        self.pipeline.exclude(revoked)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.metrics.record_rebalance("assigned")
        self._assigned |= assigned
        self._unverified |= assigned
        partitions = sorted(tp.partition for tp in assigned)
        log.info("assigned %d partitions: %s", len(assigned), ",".join(map(str, partitions)),
                 extra={"topic": self.settings.kafka.input_topic, "partitions": partitions})

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        self.metrics.record_rebalance("lost")
        log.warning("lost %d partitions (evicted); nothing is committed for them", len(lost),
                    extra={"topic": self.settings.kafka.input_topic, "partitions": sorted(tp.partition for tp in lost)})
        self.pipeline.exclude(lost)
        self._open = [r for r in self._open if TopicPartition(r.topic, r.partition) not in lost]
        self._assigned -= lost

    # --- the model thread ---------------------------------------------------------------------

    def _model_loop(self) -> None:
        while True:
            batch = self._work.get()
            if batch is None:
                return
            if self._failure is None:
                try:
                    self._process(batch)
                except BaseException as exc:  # noqa: BLE001 (reported to the consumer loop, which stops)
                    log.exception("batch %d failed; stopping", batch.seq,
                                  extra={"batch_id": batch.seq, "records": len(batch.records)})
                    self._failure = exc
            # After a failure later batches are not processed: nothing past the failed one may be committed.
            batch.error = self._failure
            batch.done.set()

    def _decode_timed(self, record: Record, post: Post) -> tuple[DecodedPost, float]:
        decoded = self.processor.decode(record, post)
        return decoded, time.monotonic()

    def _process(self, batch: Batch) -> None:
        results = [f.result() for f in batch.decoding]
        posts = [decoded for decoded, _ in results]
        # Seal to last decode done: the pool's work for this batch, not the wait for the model thread.
        self.metrics.decode_seconds.observe(max((t for _, t in results), default=batch.sealed_at) - batch.sealed_at)
        self.metrics.batch_size_posts.observe(len(batch.records))
        result = self.processor.process(posts, batch.invalid)
        self.publisher.publish(result.records, self._stopping)
        published_at = time.time()
        out_topic = self.settings.kafka.output_topic
        if result.documents:
            self.metrics.posts_published_total.labels(topic=out_topic).inc(len(result.documents))
        for reason in result.dead_letter_reasons:
            self.metrics.posts_dead_lettered_total.labels(reason=reason).inc()
        self.metrics.observe_end_to_end(result.created_at, published_at)
        if self.on_output is not None and result.documents:
            try:
                self.on_output(result.documents)
            except Exception:  # noqa: BLE001 (a display hook must not stop the service)
                log.exception("output hook failed", extra={"batch_id": batch.seq})
