"""How batches are fed, published and committed: the consumer-group loop of ``postsense serve``.

The parts it composes: ``OffsetTracker`` (batches in flight, offsets to commit, never backwards),
``RebalanceHandler`` (revoke/assign/lost, the assigned set and the open batch under one lock),
``Publisher`` (publish until acknowledged, retry only what can succeed), ``DeadLetterBreaker``, and
``connectors.kafka_compat`` (kafka-python internals and broker-specific repairs).

Threads: the *consumer loop* (the thread that calls ``Service.run``) owns the KafkaConsumer and
validates records (cheap, and the circuit breaker must count them in order); a pool of *decode* threads
decodes images and normalises texts, then builds each batch's model input (tokens, stacked pixels); one
*model* thread runs the forward pass and publishing, batch after batch, so decoding batch N+1 overlaps
inference of batch N.

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

Rebalance (``stream.rebalance``, on the consumer's IO thread): a revoke stops reading and sealing the
revoked partitions and drops their open records, waits (yielding to the IO loop, heartbeats go on) for
the batches sealed before it and for a commit in flight, commits what finished; so a graceful rebalance
publishes nothing twice. After an assignment each partition starts at the committed offset. On lost
(evicted) nothing is committed for those partitions. Shutdown (``stop()``, SIGTERM):
the open batch is sealed and finished, everything is published and committed, the consumer leaves the
group, exit 0.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from connectors.kafka import make_consumer
from connectors.kafka_compat import rewind_past_log_end, start_at_committed
from connectors.metrics import Metrics
from core.contracts import Invalid, Post
from stream.breaker import CircuitBreakerOpen, DeadLetterBreaker
from stream.offsets import Batch, OffsetTracker
from stream.processor import (
    BatchProcessor,
    DecodedPost,
    Record,
    ReferenceQueuesLike,
    decode_pool,
    torch_threads,
    validate,
)
from stream.publisher import Publisher
from stream.rebalance import RebalanceHandler
from stream.settings import Settings

if TYPE_CHECKING:
    from core.inference import Predictor, PreparedBatch

log = logging.getLogger(__name__)

OutputHook = Callable[[list[dict[str, Any]]], None]

#: Poll timeout while nothing is waiting to be sealed (bounds how fast stop() and pause changes act).
IDLE_POLL_MS = 200
#: Poll timeout while partitions are paused: short, the loop only keeps the membership alive.
PAUSED_POLL_MS = 50


class ServiceError(RuntimeError):
    """The model thread failed on a batch; nothing of that batch was committed."""


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
        self.offsets = OffsetTracker()
        self.rebalance = RebalanceHandler(
            self.offsets,
            self.metrics,
            settings.kafka.input_topic,
            revoke_wait_s=settings.kafka.session_timeout_ms / 1000,
        )
        self._stopping = threading.Event()
        self._work: queue.Queue[Batch | None] = queue.Queue()
        self._seq = 0
        self._paused = False
        self._consumer: KafkaConsumer | None = None
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
        return bool(self.rebalance.owned()) and not self.stopping

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member owns now (assigned by the group and not being revoked)."""
        return self.rebalance.owned()

    def run(self) -> None:
        """Consume until stop(); raises CircuitBreakerOpen or ServiceError on a fatal condition.

        Either way the batches finished before the failure are committed and the consumer leaves the group.
        """
        kafka = self.settings.kafka
        self._consumer = make_consumer(kafka, self.settings.batch.max_posts)
        self.rebalance.bind(self._consumer)
        threads = torch_threads()  # before the decode threads change torch's default for new threads
        self._pool = decode_pool(self.settings.batch.decode_workers)
        model_thread = threading.Thread(target=self._model_loop, args=(threads,), name="model", daemon=True)
        model_thread.start()
        self._consumer.subscribe([kafka.input_topic], listener=self.rebalance)
        log.info(
            "consuming %s as group %s",
            kafka.input_topic,
            kafka.group_id,
            extra={"topic": kafka.input_topic, "group_id": kafka.group_id},
        )
        try:
            self._loop()
        finally:
            self._work.put(None)
            self._stopping.set()
            model_thread.join(timeout=self.settings.kafka.produce_timeout_s * 2 + 5)
            self._pool.shutdown(wait=False, cancel_futures=True)
            torch_threads(threads)  # torch's default for new threads, as it was
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
                unverified = self.rebalance.take_unverified()
                if unverified:
                    moved = start_at_committed(
                        consumer,
                        unverified,
                        polled,
                        self.settings.kafka.auto_offset_reset,
                        self.settings.kafka.request_timeout_ms,
                    )
                    polled = {tp: msgs for tp, msgs in polled.items() if tp not in moved}
                for topic, count in self.rebalance.add(polled).items():
                    self.metrics.posts_consumed_total.labels(topic=topic).inc(count)
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
        return max(1, self.settings.batch.max_posts - self.rebalance.open_state()[0])

    def _poll_timeout_ms(self) -> int:
        count, since = self.rebalance.open_state()
        if not count:
            return IDLE_POLL_MS
        remaining = since + self.settings.batch.max_wait_ms / 1000 - time.monotonic()
        return max(0, int(remaining * 1000))

    def _should_seal(self) -> bool:
        count, since = self.rebalance.open_state()
        if not count or len(self.offsets) >= self.settings.batch.max_inflight_batches:
            return False
        waited = time.monotonic() - since
        return count >= self.settings.batch.max_posts or waited * 1000 >= self.settings.batch.max_wait_ms

    def _seal(self) -> None:
        """Step 4: seal the open batch (atomically with respect to a revoke) and hand it to the model thread."""
        batch = self.rebalance.seal(self._build)
        if batch is not None:
            self._work.put(batch)

    def _build(self, records: list[Record]) -> Batch:
        """Validate the records (the breaker counts them in order) and start decoding the valid ones."""
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
        decoding = [self._pool.submit(self.processor.decode, record, post) for record, post in valid]
        # Queued after its decodes (the pool is FIFO), so it waits only on decodes already running: no deadlock.
        preparing = self._pool.submit(self._prepare_timed, decoding) if decoding else None
        self._seq += 1
        return Batch(self._seq, records, decoding, invalid, sealed_at=started, preparing=preparing)

    def _commit_finished(self) -> None:
        """Step 1: commit the finished batches' next-offsets (blocking; the consumer loop's own thread)."""
        assert self._consumer is not None
        with self.rebalance.committing() as owned:
            offsets = self.offsets.take(owned)
            if not offsets:
                return
            started = time.perf_counter()
            try:
                # Bounded: kafka-python retries a retriable error forever by default, and stop() must work
                # against a broker that keeps failing commits (KafkaTimeoutError: redelivered, not lost).
                self._consumer.commit(
                    {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()},
                    timeout_ms=self.settings.kafka.request_timeout_ms,
                )
            except Exception as exc:  # membership changed or broker failing: the records will be redelivered
                log.warning(
                    "commit failed, those records will be redelivered: %s: %s", type(exc).__name__, exc
                )
                return
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise ServiceError(
                f"the model thread failed: {type(self._failure).__name__}: {self._failure}"
            ) from (self._failure)

    def _apply_backpressure(self) -> None:
        """Step 2: pause every assigned partition while the pipeline is full; resume when it has room."""
        assert self._consumer is not None
        full = len(self.offsets) >= self.settings.batch.max_inflight_batches
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
            log.debug(
                "%s partitions (pipeline %s)", "paused" if full else "resumed", "full" if full else "has room"
            )

    def _update_lag(self) -> None:
        assert self._consumer is not None
        lag: dict[tuple[str, int], int] = {}
        for tp in self.rebalance.owned():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:  # bounded: without a position kafka-python fetches the committed offset, retrying forever
                position = self._consumer.position(tp, timeout_ms=self.settings.kafka.request_timeout_ms)
            except KafkaTimeoutError:  # a broker that cannot answer OffsetFetch: no lag for it this round
                continue
            if position > highwater:
                # The partition was recreated: what is in hand of it belongs to the old log, never commit it.
                self.rebalance.drop({tp})
                rewind_past_log_end(
                    self._consumer,
                    tp,
                    position,
                    highwater,
                    self.settings.kafka.auto_offset_reset,
                    self.settings.kafka.request_timeout_ms,
                )
                continue
            lag[(tp.topic, tp.partition)] = highwater - position
        self.metrics.set_consumer_lag(lag)

    def _drain(self) -> None:
        """Finish every batch in the pipeline and commit it, polling (paused) so the member stays in the group."""
        assert self._consumer is not None
        deadline = time.monotonic() + self.settings.kafka.max_poll_interval_ms / 1000
        while len(self.offsets) and time.monotonic() < deadline:
            self._raise_failure()
            self._commit_finished()
            if not len(self.offsets):
                break
            if not self._consumer.paused() and self._consumer.assignment():
                self._consumer.pause(*self._consumer.assignment())
            self._consumer.poll(timeout_ms=PAUSED_POLL_MS)
        self._commit_finished()

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(timeout_ms=self.settings.kafka.request_timeout_ms)
            except Exception as exc:  # closing must not mask why the loop ended
                log.debug("closing the consumer: %s", exc)
            self._consumer = None
            self.rebalance.clear()
            self.metrics.set_consumer_lag({})

    # --- the model thread ---------------------------------------------------------------------

    def _model_loop(self, threads: int) -> None:
        torch_threads(threads)
        while True:
            batch = self._work.get()
            if batch is None:
                return
            if self._failure is None:
                try:
                    self._process(batch)
                except BaseException as exc:  # reported to the consumer loop, which stops
                    log.exception(
                        "batch %d failed; stopping",
                        batch.seq,
                        extra={"batch_id": batch.seq, "records": len(batch.records)},
                    )
                    self._failure = exc
            # After a failure later batches are not processed: nothing past the failed one may be committed.
            batch.error = self._failure
            batch.done.set()

    def _prepare_timed(self, decoding: list[Future[DecodedPost]]) -> tuple[PreparedBatch, float]:
        """The batch's model input, off the model thread (tokenising and stacking took ~4 % of its time)."""
        prepared = self.processor.prepare([f.result() for f in decoding])
        return prepared, time.monotonic()

    def _process(self, batch: Batch) -> None:
        posts = [f.result() for f in batch.decoding]
        prepared, ready_at = batch.preparing.result() if batch.preparing else (None, batch.sealed_at)
        # Seal to model input ready: the pool's work for this batch, not the wait for the model thread.
        self.metrics.decode_seconds.observe(ready_at - batch.sealed_at)
        self.metrics.batch_size_posts.observe(len(batch.records))
        result = self.processor.process(posts, batch.invalid, prepared)
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
            except Exception:  # a display hook must not stop the service
                log.exception("output hook failed", extra={"batch_id": batch.seq})
