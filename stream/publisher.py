"""Publishing a batch until every record is acknowledged, recreating the producer when the broker refuses it.

``producer.flush()`` returns when every request has completed, acknowledged *or failed*; only each
send's future says which. A batch therefore counts as published only when every future resolved
without an error, and only then may its offsets be committed. Records that failed are sent again
(the ones already acknowledged are not), so nothing is lost and nothing is committed past an
unpublished record; a retried send may at worst duplicate a record whose acknowledgement was lost.

Only what can succeed is retried: an error kafka-python marks ``retriable`` (timeouts, lost
connections, leader changes), or one a new producer cures. Anything else (a record larger than the
broker accepts, an authorization failure, a bug) would fail forever: the batch fails at once with
UnpublishableError, and the service stops with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from connectors.kafka import PRODUCER_FATAL_ERRORS, KafkaSettings, make_producer
from connectors.kafka_compat import abort_pending_sends
from connectors.metrics import Metrics
from core.contracts import Limits
from stream.processor import OutgoingRecord

log = logging.getLogger(__name__)

#: After this many failed attempts in a row the producer is recreated even without a fatal error class:
#: a fresh producer (new connections, new producer id) is cheap next to a stuck batch.
RECREATE_AFTER_FAILED_ATTEMPTS = 3
BACKOFF_MAX_S = 5.0
#: How long closing waits for the I/O thread to fail the aborted records (it only has to wake up).
ABORT_CLOSE_TIMEOUT_S = 2.0


class PublishError(RuntimeError):
    """The batch could not be published before shutdown; its offsets are not committed."""


class UnpublishableError(PublishError):
    """The broker refused the batch with an error that no retry can cure; its offsets are not committed."""


def cured_by_new_producer(error: BaseException) -> bool:
    """The broker forgot this producer (``PRODUCER_FATAL_ERRORS``), or the producer entered a fatal state.

    kafka-python 3 reports the latter as a bare KafkaError on every pending send, e.g. once InitProducerId
    failed after a broker restart (Tansu answers UnknownError there): the producer never recovers by itself.
    """
    return isinstance(error, PRODUCER_FATAL_ERRORS) or type(error) is KafkaError


def retriable(error: BaseException) -> bool:
    """Whether sending again can succeed: kafka-python's ``retriable`` flag, or a fault a new producer cures."""
    if cured_by_new_producer(error):
        return True
    if isinstance(error, KafkaError):
        return bool(error.retriable)
    return isinstance(error, OSError)  # a socket error kafka-python did not wrap


class Publisher:
    """Owns the producer. ``publish`` blocks until the whole batch is acknowledged (or shutdown gives up)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        limits: Limits,
        metrics: Metrics,
        producer_factory: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        self.kafka = kafka
        self.metrics = metrics
        self._factory = producer_factory or (lambda: make_producer(kafka, limits))
        self._producer: KafkaProducer | None = None
        self._failing = False

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = self._factory()
        return self._producer

    def publish(self, records: Sequence[OutgoingRecord], stopping: threading.Event) -> None:
        """Send every record and wait until each is acknowledged.

        Retries failed records with backoff for as long as the service runs; once ``stopping`` is set,
        gives up after one more produce timeout and raises PublishError, so shutdown stays bounded.
        """
        pending = list(records)
        attempts = 0
        give_up_at: float | None = None
        while pending:
            pending, error = self._attempt(pending)
            if not pending:
                break
            attempts += 1
            if attempts == 1:
                self.metrics.publish_failures_total.inc()
            if error is not None and not retriable(error):
                raise UnpublishableError(
                    f"{len(pending)} records cannot be published, not retrying: {type(error).__name__}: {error}"
                ) from error
            if not self._failing:  # one line per state change, not per retry
                log.warning(
                    "publishing failed (%s: %s); retrying %d records",
                    type(error).__name__,
                    error,
                    len(pending),
                )
                self._failing = True
            if (
                error is not None and cured_by_new_producer(error)
            ) or attempts % RECREATE_AFTER_FAILED_ATTEMPTS == 0:
                self.recreate(error)
            if stopping.is_set():
                give_up_at = give_up_at or time.monotonic() + self.kafka.produce_timeout_s
                if time.monotonic() >= give_up_at:
                    raise PublishError(f"{len(pending)} records unpublished at shutdown: {error}")
            stopping.wait(min(BACKOFF_MAX_S, 0.2 * 2**attempts))
        if self._failing:
            log.info("publishing recovered")
            self._failing = False

    def _attempt(self, records: list[OutgoingRecord]) -> tuple[list[OutgoingRecord], BaseException | None]:
        """One round: send all, flush, check every future. Returns the failed records and an error among
        theirs: one that cannot be retried if any, so that a single hopeless record is never retried."""
        deadline = time.monotonic() + self.kafka.produce_timeout_s
        sent = []
        failed: list[OutgoingRecord] = []
        error: BaseException | None = None
        for index, record in enumerate(records):
            try:
                future = self.producer.send(
                    record.topic, key=record.key, value=record.value, headers=record.headers
                )
            except Exception as exc:  # buffer full, metadata timeout, fenced producer, record too large...
                return failed + records[index:], exc
            sent.append((record, future))
        try:
            self.producer.flush(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # flush timing out still leaves each future to check
            error = exc
        for record, future in sent:
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # any failed or unresolved send leaves the record pending
                failed.append(record)
                if error is None or retriable(error):
                    error = exc
        return failed, error

    def recreate(self, reason: BaseException | None) -> None:
        """Close the producer and let the next send build a new one (new producer id, new sequences)."""
        log.info("recreating the Kafka producer after %s", type(reason).__name__ if reason else "failures")
        self.metrics.producer_recreated_total.inc()
        self.close(timeout_s=0)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                try:
                    producer.close(timeout=timeout_s)
                except KafkaTimeoutError:
                    # close() flushes first and, with records still pending, raises before it stops the
                    # producer's I/O thread: every recreation would leak a thread and its connections.
                    # Those records are re-sent by the next producer or reported unpublished, so abort them,
                    # after which close() returns at once.
                    abort_pending_sends(producer)
                    producer.close(timeout=ABORT_CLOSE_TIMEOUT_S)
            except Exception as exc:  # closing a broken producer must not mask the real error
                log.debug("closing the producer: %s", exc)
