"""Prometheus metrics of the postsense service (the HTTP server that exposes them: connectors/metrics_server.py).

Naming follows Prometheus practice: one prefix (``postsense_``), base units (seconds), ``_total`` on
counters, histograms for latencies and sizes, and only bounded label values (topics, partitions,
modalities, states, reasons, labels: never a post id). The names and types are the contract of the
dashboard and the alert rules, so they are written once, in ``METRIC_SPECS``: ``Metrics`` builds its
registry from that table, and ``deploy/metrics.txt`` (read by the deploy checks) is generated from it::

    python -m connectors.metrics > deploy/metrics.txt

A test fails when the committed file and the table disagree.

The Python attribute of each metric is its name without the prefix, e.g.
``metrics.posts_consumed_total.labels(topic=t).inc(n)``. A few helpers turn whole batches into
observations so that the runtime's call sites stay one line each.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections import Counter as _Tally
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Literal, Protocol

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


MetricKind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family, declared once for both the registry and ``deploy/metrics.txt``.

    ``attr`` is the ``Metrics`` attribute; the exported name is it with the prefix (``name``), so the
    two cannot drift apart. ``buckets`` belong to histograms only.
    """

    attr: str
    kind: MetricKind
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.buckets) != (self.kind == "histogram"):
            raise ValueError(f"{self.attr}: a histogram needs buckets and only a histogram takes them")

    @property
    def name(self) -> str:
        """The name PromQL sees (a counter's ends in ``_total``; a histogram's adds _bucket, _sum, _count)."""
        return f"{PREFIX}_{self.attr}"

    def create(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        """Register this family in ``registry`` and return it."""
        if self.kind == "histogram":
            return Histogram(
                self.attr, self.help, self.labels, namespace=PREFIX, registry=registry, buckets=self.buckets
            )
        cls = Counter if self.kind == "counter" else Gauge
        return cls(self.attr, self.help, self.labels, namespace=PREFIX, registry=registry)


#: Every postsense metric, in the order of ``deploy/metrics.txt``: attribute, kind, labels, help, buckets.
# fmt: off
METRIC_SPECS: tuple[MetricSpec, ...] = (
    # Flow through the service.
    MetricSpec("posts_consumed_total", "counter", ("topic",),
               "Records read from the input topic (valid or not)."),
    MetricSpec("posts_published_total", "counter", ("topic",),
               "Sentiment records acknowledged by the broker."),
    MetricSpec("posts_dead_lettered_total", "counter", ("reason",),
               "Input records sent to the dead-letter topic, by reason."),
    MetricSpec("batch_size_posts", "histogram", (),
               "Posts per micro-batch.", BATCH_SIZE_BUCKETS),
    MetricSpec("inference_seconds", "histogram", (),
               "Model time per batch (the forward pass).", INFERENCE_BUCKETS),
    MetricSpec("decode_seconds", "histogram", (),
               "Time to validate, decode and prepare one batch (images, texts, model input) in the worker pool.",
               DECODE_BUCKETS),
    MetricSpec("end_to_end_seconds", "histogram", (),
               "Post created_at to its sentiment record being acknowledged.", END_TO_END_BUCKETS),
    MetricSpec("commit_seconds", "histogram", (),
               "Offset commit time per batch.", COMMIT_BUCKETS),
    # Consumer-group state.
    MetricSpec("rebalances_total", "counter", ("event",),
               "Partition assignment changes seen by this member."),
    MetricSpec("paused", "gauge", (),
               "1 while the assigned partitions are paused for back-pressure."),
    MetricSpec("consumer_lag_messages", "gauge", ("topic", "partition"),
               "Highwater minus position per assigned partition (this member's view)."),
    # What the model saw and said.
    MetricSpec("modality_state_total", "counter", ("modality", "state"),
               "Posts by modality and its state (ok, missing, empty, undecodable)."),
    MetricSpec("modality_quality", "histogram", ("modality",),
               "Quality score q in (0, 1] of each present modality.", QUALITY_BUCKETS),
    MetricSpec("recovered_total", "counter", ("modality",),
               "Posts whose modality was recovered by a DRF converter."),
    MetricSpec("predictions_total", "counter", ("label",),
               "Published predictions by label."),
    MetricSpec("abstained_total", "counter", (),
               "Posts with neither modality usable (published with label null)."),
    MetricSpec("text_truncated_total", "counter", (),
               "Posts whose text was cut at limits.max_text_chars (text_truncated in the record)."),
    # Reference queues (Redis).
    MetricSpec("reference_queue_length", "gauge", ("modality",),
               "Features in the reference queue."),
    MetricSpec("reference_drift_sigmas", "gauge", ("modality",),
               "Distance of the live reference mean from the checkpoint's, in checkpoint sigmas."),
    MetricSpec("reference_acceptance_ratio", "gauge", ("modality",),
               "Share of proposed features the queue admission rule accepted, last batch."),
    MetricSpec("reference_accepted_total", "counter", ("modality",),
               "Features accepted into the reference queue."),
    MetricSpec("redis_up", "gauge", (),
               "1 while Redis answers; 0 while the service runs on cached statistics."),
    # Publishing health.
    MetricSpec("producer_recreated_total", "counter", (),
               "Kafka producers closed and recreated after the broker refused them."),
    MetricSpec("publish_failures_total", "counter", (),
               "Batches whose records were not all acknowledged (not committed)."),
    MetricSpec("circuit_breaker_open", "gauge", (),
               "1 once the dead-letter circuit breaker has stopped consumption."),
    MetricSpec("build_info", "gauge", ("version", "model_name", "model_version", "device"),
               "Always 1; the labels say what runs."),
)
# fmt: on

#: (name, kind, labels) of the standard process_* and python_gc_* families (CPython on Linux) that
#: ``Metrics`` adds, so that memory, CPU, restarts and collections show without a node exporter.
STANDARD_FAMILIES: tuple[tuple[str, MetricKind, tuple[str, ...]], ...] = (
    ("process_virtual_memory_bytes", "gauge", ()),
    ("process_resident_memory_bytes", "gauge", ()),
    ("process_start_time_seconds", "gauge", ()),
    ("process_cpu_seconds_total", "counter", ()),
    ("process_open_fds", "gauge", ()),
    ("process_max_fds", "gauge", ()),
    ("python_gc_objects_collected_total", "counter", ("generation",)),
    ("python_gc_objects_uncollectable_total", "counter", ("generation",)),
    ("python_gc_collections_total", "counter", ("generation",)),
)

_METRICS_TXT_HEADER = """\
# Every metric family postsense exports (connectors/metrics.py): the contract of the Grafana dashboard
# and the Prometheus alert rules. Generated from METRIC_SPECS; do not edit by hand, regenerate with
#   python -m connectors.metrics > deploy/metrics.txt
# Columns: name (as PromQL sees it; histograms add _bucket, _sum, _count), type, labels ('-' for none).
"""
_METRICS_TXT_STANDARD = (
    "# Standard prometheus_client collectors on the same registry (CPython on Linux):"
    " memory, CPU, restarts, GC.\n"
)


def _metrics_txt_row(name: str, kind: str, labels: tuple[str, ...]) -> str:
    return f"{name:<42} {kind:<10} {','.join(labels) or '-'}\n"


def metrics_txt() -> str:
    """The text of ``deploy/metrics.txt``, generated so that the file cannot drift from the table."""
    ours = "".join(_metrics_txt_row(spec.name, spec.kind, spec.labels) for spec in METRIC_SPECS)
    standard = "".join(_metrics_txt_row(*family) for family in STANDARD_FAMILIES)
    return _METRICS_TXT_HEADER + ours + _METRICS_TXT_STANDARD + standard


class Metrics:
    """Every metric the service exports, registered in one registry (a fresh one per instance by default).

    A private registry per instance lets tests and several in-process services coexist; the server
    below exposes exactly this registry. The annotations give callers typed attributes; each one
    names an entry of ``METRIC_SPECS`` (a test keeps the two equal).
    """

    posts_consumed_total: Counter
    posts_published_total: Counter
    posts_dead_lettered_total: Counter
    batch_size_posts: Histogram
    inference_seconds: Histogram
    decode_seconds: Histogram
    end_to_end_seconds: Histogram
    commit_seconds: Histogram
    rebalances_total: Counter
    paused: Gauge
    consumer_lag_messages: Gauge
    modality_state_total: Counter
    modality_quality: Histogram
    recovered_total: Counter
    predictions_total: Counter
    abstained_total: Counter
    text_truncated_total: Counter
    reference_queue_length: Gauge
    reference_drift_sigmas: Gauge
    reference_acceptance_ratio: Gauge
    reference_accepted_total: Counter
    redis_up: Gauge
    producer_recreated_total: Counter
    publish_failures_total: Counter
    circuit_breaker_open: Gauge
    build_info: Gauge

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        for spec in METRIC_SPECS:
            setattr(self, spec.attr, spec.create(self.registry))
        # RSS, CPU, open files, start time (restarts) and garbage collections: STANDARD_FAMILIES.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)

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


if __name__ == "__main__":
    sys.stdout.write(metrics_txt())
