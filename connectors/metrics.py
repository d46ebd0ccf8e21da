"""Prometheus metrics of the postsense service and the HTTP server that exposes them.

Naming follows Prometheus practice: one prefix (``postsense_``), base units (seconds), ``_total`` on
counters, histograms for latencies and sizes, and only bounded label values (topics, partitions,
modalities, states, reasons, labels: never a post id). The names and types are the contract of the
dashboard and the alert rules; ``deploy/metrics.txt`` lists them and a test keeps the two equal.

The Python attribute of each metric is its name without the prefix, e.g.
``metrics.posts_consumed_total.labels(topic=t).inc(n)``. A few helpers turn whole batches into
observations so that the runtime's call sites stay one line each.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter as _Tally
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from pydantic import Field

from connectors.config import Section
from core.contracts import MODALITIES, ModalityState

log = logging.getLogger(__name__)

# prometheus-client would add a ``*_created`` gauge next to every counter and histogram; Prometheus 2
# stores those as separate series, doubling the series count for no dashboard use.
prometheus_client.disable_created_metrics()


class MetricsSettings(Section):
    host: str = "0.0.0.0"
    port: int = Field(9400, ge=0, le=65535)  # 0 = pick a free port (tests)


PREFIX = "postsense"
#: Modality states, the output contract's words for both modalities.
MODALITY_STATES = tuple(state.value for state in ModalityState)
REBALANCE_EVENTS = ("assigned", "revoked", "lost")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DECODE_BUCKETS = INFERENCE_BUCKETS
END_TO_END_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Quality q = exp(-||f-mu||^2 / 2 sigma^2) lies in (0, 1]; a member at one sigma from the mean has q ~ 0.61.
QUALITY_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class PredictionLike(Protocol):
    """The fields of ``core.inference.BatchPrediction`` that metrics read (kept structural: no torch import)."""

    @property
    def labels(self) -> Sequence[str | None]: ...
    @property
    def quality_image(self) -> Iterable[float]: ...
    @property
    def quality_text(self) -> Iterable[float]: ...
    @property
    def recovered(self) -> Sequence[str | None]: ...
    @property
    def abstained(self) -> Iterable[bool]: ...


def _state_name(state: str | Enum) -> str:
    value = state.value if isinstance(state, Enum) else state
    if value not in MODALITY_STATES:
        raise ValueError(f"unknown modality state {value!r}; expected one of {', '.join(MODALITY_STATES)}")
    return value


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    return modality


def parse_created_at(value: str | None) -> float | None:
    """Unix time of an ISO-8601 ``created_at`` (``Z`` or an offset; naive means UTC), or None if unusable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class Metrics:
    """Every metric the service exports, registered in one registry (a fresh one per instance by default).

    A private registry per instance lets tests and several in-process services coexist; the server
    below exposes exactly this registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = PREFIX

        # Flow through the service.
        self.posts_consumed_total = Counter(
            "posts_consumed_total",
            "Records read from the input topic (valid or not).",
            ["topic"],
            namespace=ns,
            registry=r,
        )
        self.posts_published_total = Counter(
            "posts_published_total",
            "Sentiment records acknowledged by the broker.",
            ["topic"],
            namespace=ns,
            registry=r,
        )
        self.posts_dead_lettered_total = Counter(
            "posts_dead_lettered_total",
            "Input records sent to the dead-letter topic, by reason.",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.batch_size_posts = Histogram(
            "batch_size_posts", "Posts per micro-batch.", buckets=BATCH_SIZE_BUCKETS, namespace=ns, registry=r
        )
        self.inference_seconds = Histogram(
            "inference_seconds",
            "Model time per batch (prepare + predict).",
            buckets=INFERENCE_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "decode_seconds",
            "Time to validate and decode one batch (images and texts) in the worker pool.",
            buckets=DECODE_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "end_to_end_seconds",
            "Post created_at to its sentiment record being acknowledged.",
            buckets=END_TO_END_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "commit_seconds",
            "Offset commit time per batch.",
            buckets=COMMIT_BUCKETS,
            namespace=ns,
            registry=r,
        )

        # Consumer-group state.
        self.rebalances_total = Counter(
            "rebalances_total",
            "Partition assignment changes seen by this member.",
            ["event"],
            namespace=ns,
            registry=r,
        )
        self.paused = Gauge(
            "paused",
            "1 while the assigned partitions are paused for back-pressure.",
            namespace=ns,
            registry=r,
        )
        self.consumer_lag_messages = Gauge(
            "consumer_lag_messages",
            "Highwater minus position per assigned partition (this member's view).",
            ["topic", "partition"],
            namespace=ns,
            registry=r,
        )

        # What the model saw and said.
        self.modality_state_total = Counter(
            "modality_state_total",
            "Posts by modality and its state (ok, missing, empty, undecodable).",
            ["modality", "state"],
            namespace=ns,
            registry=r,
        )
        self.modality_quality = Histogram(
            "modality_quality",
            "Quality score q in (0, 1] of each present modality.",
            ["modality"],
            buckets=QUALITY_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.recovered_total = Counter(
            "recovered_total",
            "Posts whose modality was recovered by a DRF converter.",
            ["modality"],
            namespace=ns,
            registry=r,
        )
        self.predictions_total = Counter(
            "predictions_total", "Published predictions by label.", ["label"], namespace=ns, registry=r
        )
        self.text_truncated_total = Counter(
            "text_truncated_total",
            "Posts whose text was cut at limits.max_text_chars (text_truncated in the record).",
            namespace=ns,
            registry=r,
        )
        self.abstained_total = Counter(
            "abstained_total",
            "Posts with neither modality usable (published with label null).",
            namespace=ns,
            registry=r,
        )

        # Reference queues (Redis).
        self.reference_queue_length = Gauge(
            "reference_queue_length",
            "Features in the reference queue.",
            ["modality"],
            namespace=ns,
            registry=r,
        )
        self.reference_drift_sigmas = Gauge(
            "reference_drift_sigmas",
            "Distance of the live reference mean from the checkpoint's, in checkpoint sigmas.",
            ["modality"],
            namespace=ns,
            registry=r,
        )
        self.reference_acceptance_ratio = Gauge(
            "reference_acceptance_ratio",
            "Share of proposed features the queue admission rule accepted, last batch.",
            ["modality"],
            namespace=ns,
            registry=r,
        )
        self.reference_accepted_total = Counter(
            "reference_accepted_total",
            "Features accepted into the reference queue.",
            ["modality"],
            namespace=ns,
            registry=r,
        )
        self.redis_up = Gauge(
            "redis_up",
            "1 while Redis answers; 0 while the service runs on cached statistics.",
            namespace=ns,
            registry=r,
        )

        # Publishing health.
        self.producer_recreated_total = Counter(
            "producer_recreated_total",
            "Kafka producers closed and recreated after the broker refused them.",
            namespace=ns,
            registry=r,
        )
        self.publish_failures_total = Counter(
            "publish_failures_total",
            "Batches whose records were not all acknowledged (not committed).",
            namespace=ns,
            registry=r,
        )
        self.circuit_breaker_open = Gauge(
            "circuit_breaker_open",
            "1 once the dead-letter circuit breaker has stopped consumption.",
            namespace=ns,
            registry=r,
        )
        self.build_info = Gauge(
            "build_info",
            "Always 1; the labels say what runs.",
            ["version", "model_name", "model_version", "device"],
            namespace=ns,
            registry=r,
        )

        # RSS, CPU, open files, start time (restarts) and garbage collections of this process: the standard
        # process_* and python_gc_* families, so memory and restarts show without a node exporter.
        ProcessCollector(registry=r)
        GCCollector(registry=r)

        self._lag_keys: set[tuple[str, str]] = set()
        self._lag_lock = threading.Lock()

    # --- helpers for the runtime -------------------------------------------------------------

    def set_build_info(self, version: str, model_name: str, model_version: str, device: str) -> None:
        """Record what runs; replaces any earlier value so exactly one series remains."""
        self.build_info.clear()
        self.build_info.labels(
            version=version, model_name=model_name, model_version=model_version, device=device
        ).set(1)

    def observe_modality_states(self, modality: str, states: Iterable[str | Enum]) -> None:
        """Count one state per post (strings or ``ModalityState`` members); one increment per distinct state."""
        _check_modality(modality)
        for state, n in _Tally(_state_name(s) for s in states).items():
            self.modality_state_total.labels(modality=modality, state=state).inc(n)

    def observe_prediction(self, prediction: PredictionLike) -> None:
        """Labels, abstentions, recoveries and the quality of every present modality of one batch."""
        for label, n in _Tally(label for label in prediction.labels if label is not None).items():
            self.predictions_total.labels(label=label).inc(n)
        abstained = sum(bool(a) for a in prediction.abstained)
        if abstained:
            self.abstained_total.inc(abstained)
        for modality, n in _Tally(m for m in prediction.recovered if m is not None).items():
            self.recovered_total.labels(modality=_check_modality(modality)).inc(n)
        for modality, scores in (("image", prediction.quality_image), ("text", prediction.quality_text)):
            child = self.modality_quality.labels(modality=modality)
            for q in scores:
                if not math.isnan(q):  # NaN marks an absent modality
                    child.observe(float(q))

    def observe_end_to_end(self, created_at: Iterable[str | None], published_at: float) -> int:
        """Observe ``published_at - created_at`` (unix seconds) per post; returns how many were usable.

        Posts without a parseable ``created_at``, or created after ``published_at`` (producer clock
        ahead of ours), are skipped rather than recorded as zero or negative latencies.
        """
        observed = 0
        for value in created_at:
            created = parse_created_at(value)
            if created is not None and created <= published_at:
                self.end_to_end_seconds.observe(published_at - created)
                observed += 1
        return observed

    def set_consumer_lag(self, lag: Mapping[tuple[str, int], int]) -> None:
        """Replace the lag gauges with ``{(topic, partition): highwater - position}`` for the current assignment.

        Partitions absent from ``lag`` (revoked or lost) lose their series, so summing the gauge over
        the group's pods never counts a partition twice.
        """
        keys = {(topic, str(partition)) for topic, partition in lag}
        with self._lag_lock:
            for gone in self._lag_keys - keys:
                self.consumer_lag_messages.remove(*gone)
            for (topic, partition), value in lag.items():
                self.consumer_lag_messages.labels(topic=topic, partition=str(partition)).set(max(0, value))
            self._lag_keys = keys

    def record_rebalance(self, event: str) -> None:
        """Count one assignment change (a listener callback); ``event`` is assigned, revoked or lost."""
        if event not in REBALANCE_EVENTS:
            raise ValueError(
                f"unknown rebalance event {event!r}; expected one of {', '.join(REBALANCE_EVENTS)}"
            )
        self.rebalances_total.labels(event=event).inc()

    def set_reference(
        self,
        modality: str,
        *,
        queue_length: int | None = None,
        drift_sigmas: float | None = None,
        acceptance_ratio: float | None = None,
        accepted: int = 0,
    ) -> None:
        """Update the reference-queue gauges of one modality; None leaves a gauge unchanged."""
        _check_modality(modality)
        if queue_length is not None:
            self.reference_queue_length.labels(modality=modality).set(queue_length)
        if drift_sigmas is not None:
            self.reference_drift_sigmas.labels(modality=modality).set(drift_sigmas)
        if acceptance_ratio is not None:
            self.reference_acceptance_ratio.labels(modality=modality).set(acceptance_ratio)
        if accepted:
            self.reference_accepted_total.labels(modality=modality).inc(accepted)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (Prometheus text or OpenMetrics), and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server.metrics.exposition(self.headers.get("Accept"))
            self._reply(200, body, content_type)
        elif path == "/healthz":
            self._probe(self.server.alive, "alive", "not alive")
        elif path == "/readyz":
            self._probe(self.server.ready, "ready", "not ready")
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _probe(self, check: Callable[[], bool], ok: str, not_ok: str) -> None:
        # A probe callback that raises must not kill the server thread: report it as failing.
        try:
            good = bool(check())
            why = ""
        except Exception as exc:  # any failure of the check means "not ok"
            good, why = False, f": {type(exc).__name__}: {exc}"
        self._reply(200 if good else 503, f"{ok if good else not_ok + why}\n".encode())

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # One line per scrape or probe would drown the service's own log.
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: Metrics, ready: Callable[[], bool], alive: Callable[[], bool]
    ) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.ready = ready
        self.alive = alive


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` (alive) and ``/readyz`` (``ready()``: model loaded, partitions assigned).

    Runs in a daemon thread so that a slow scrape never delays the consumer loop. ``port=0`` picks a
    free port (read it back from ``.port``). ``alive`` defaults to "the process answers"; the runtime
    can pass a check of its own loop (e.g. it polled recently) so that Kubernetes restarts a stuck pod.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str = "0.0.0.0",
        port: int = 9400,
        ready: Callable[[], bool] = lambda: True,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        try:
            self._server = _Server((host, port), metrics, ready, alive)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port: int = self._server.server_address[1]
        # A short poll interval makes close() return within ~0.1 s (shutdown waits for the next poll).
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
