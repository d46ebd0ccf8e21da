"""The metrics registry and its HTTP server: what a Prometheus scrape and a Kubernetes probe see."""

from __future__ import annotations

import math
import socket
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from connectors.metrics import (
    METRIC_SPECS,
    STANDARD_FAMILIES,
    Metrics,
    MetricSpec,
    metrics_txt,
)
from connectors.metrics_server import MetricsServer

METRICS_TXT = Path(__file__).resolve().parents[2] / "deploy" / "metrics.txt"


def checked_in_metrics() -> dict[str, tuple[str, set[str]]]:
    """deploy/metrics.txt as {name: (type, label names)}."""
    out = {}
    for line in METRICS_TXT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind, labels = line.split()
            out[name] = (kind, set() if labels == "-" else set(labels.split(",")))
    return out


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, without raising on 4xx/5xx."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(metrics: Metrics) -> dict[str, list]:
    """{sample name: [samples]} from a real HTTP scrape."""
    with MetricsServer(metrics, "127.0.0.1", 0) as server:
        status, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    matching = [
        s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) == 1, f"{name}{labels}: {len(matching)} samples"
    return matching[0]


@dataclass
class FakePrediction:
    """Shaped like core.inference.BatchPrediction (only the fields metrics read)."""

    labels: list[str | None]
    quality_image: np.ndarray
    quality_text: np.ndarray
    recovered: list[str | None]
    abstained: np.ndarray


def populate(m: Metrics) -> None:
    """One of everything, through the helpers the runtime uses."""
    m.posts_consumed_total.labels(topic="posts").inc(5)
    m.posts_published_total.labels(topic="sentiment").inc(4)
    m.posts_dead_lettered_total.labels(reason="not_json").inc()
    for hist in (m.batch_size_posts, m.inference_seconds, m.decode_seconds, m.commit_seconds):
        hist.observe(1)
    m.observe_end_to_end(["2026-01-01T00:00:00Z"], published_at=1767225601.0)
    m.record_rebalance("assigned")
    m.paused.set(0)
    m.set_consumer_lag({("posts", 0): 3})
    m.observe_modality_states("image", ["ok", "missing"])
    m.observe_prediction(
        FakePrediction(
            ["positive", None],
            np.array([0.5, np.nan]),
            np.array([0.9, np.nan]),
            ["text", None],
            np.array([False, True]),
        )
    )
    m.set_reference("image", queue_length=512, drift_sigmas=0.1, acceptance_ratio=0.5, accepted=3)
    m.redis_up.set(1)
    m.producer_recreated_total.inc()
    m.publish_failures_total.inc()
    m.circuit_breaker_open.set(0)
    m.set_build_info("0.1.0", "tiny", "abc123", "cpu")


def test_checked_in_list_is_the_one_the_spec_table_generates() -> None:
    # The dashboards and alert rules are checked against deploy/metrics.txt, so it must follow the table.
    regenerate = "regenerate it: python -m connectors.metrics > deploy/metrics.txt"
    assert METRICS_TXT.read_text().splitlines() == metrics_txt().splitlines(), regenerate
    from_table = {spec.name: (spec.kind, set(spec.labels)) for spec in METRIC_SPECS}
    from_table |= {name: (kind, set(labels)) for name, kind, labels in STANDARD_FAMILIES}
    assert checked_in_metrics() == from_table, regenerate


def test_every_spec_is_a_typed_attribute_of_its_kind() -> None:
    # The class annotations are what mypy sees; they must name exactly the table's metrics, with their kinds.
    kinds = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}
    hints = typing.get_type_hints(Metrics)
    annotated = {attr: kinds[hint] for attr, hint in hints.items() if hint in kinds}
    assert annotated == {spec.attr: spec.kind for spec in METRIC_SPECS}
    m = Metrics()
    for spec in METRIC_SPECS:
        assert isinstance(getattr(m, spec.attr), hints[spec.attr]), spec.attr


def test_help_and_buckets_come_from_the_table() -> None:
    # The registry is built in a loop: every option of a spec must reach prometheus_client.
    m = Metrics()
    m.modality_quality.labels(modality="image")
    families = {family.name: family for family in m.registry.collect()}
    for spec in METRIC_SPECS:
        family = families[spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name]
        assert family.documentation == spec.help, spec.name
        bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
        expected = [*map(float, spec.buckets), math.inf] if spec.buckets else []
        assert bounds == expected, spec.name


def test_a_histogram_spec_needs_buckets() -> None:
    with pytest.raises(ValueError, match="needs buckets"):
        MetricSpec("x_seconds", "histogram", (), "No buckets.")
    with pytest.raises(ValueError, match="only a histogram"):
        MetricSpec("x_total", "counter", (), "Buckets on a counter.", (1.0,))


def test_exported_names_and_types_equal_the_checked_in_list() -> None:
    with MetricsServer(Metrics(), "127.0.0.1", 0) as server:
        _, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
    exported = {}
    for family in text_string_to_metric_families(body):
        name = family.name + "_total" if family.type == "counter" else family.name
        exported[name] = family.type
    assert exported == {name: kind for name, (kind, _) in checked_in_metrics().items()}


def test_exported_label_names_equal_the_checked_in_list() -> None:
    m = Metrics()
    populate(m)
    expected = checked_in_metrics()
    seen: dict[str, set[str]] = {}
    with MetricsServer(m, "127.0.0.1", 0) as server:
        _, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
    for family in text_string_to_metric_families(body):
        name = family.name + "_total" if family.type == "counter" else family.name
        for sample in family.samples:
            seen.setdefault(name, set()).update(set(sample.labels) - {"le"})
    assert seen == {name: labels for name, (_, labels) in expected.items()}


def test_every_name_follows_prometheus_conventions() -> None:
    for name, (kind, labels) in checked_in_metrics().items():
        assert name.startswith(("postsense_", "process_", "python_gc_")), (
            name
        )  # the last two: standard collectors
        assert (kind == "counter") == name.endswith("_total"), name
        assert not {"id", "post_id", "key", "offset"} & labels, f"{name} has an unbounded label"
    assert checked_in_metrics()["postsense_inference_seconds"][0] == "histogram"


def test_observe_prediction_counts_labels_abstentions_recoveries_and_present_qualities() -> None:
    m = Metrics()
    m.observe_prediction(
        FakePrediction(
            labels=["positive", "negative", "positive", None],
            quality_image=np.array([0.5, np.nan, 0.25, np.nan]),  # NaN = image absent
            quality_text=np.array([1.0, 0.75, np.nan, np.nan]),
            recovered=["text", "image", None, None],
            abstained=np.array([False, False, False, True]),
        )
    )
    s = scrape(m)
    assert value(s, "postsense_predictions_total", label="positive") == 2
    assert value(s, "postsense_predictions_total", label="negative") == 1
    assert {x.labels["label"] for x in s["postsense_predictions_total"]} == {"positive", "negative"}
    assert value(s, "postsense_abstained_total") == 1
    assert value(s, "postsense_recovered_total", modality="text") == 1
    assert value(s, "postsense_recovered_total", modality="image") == 1
    assert value(s, "postsense_modality_quality_count", modality="image") == 2
    assert value(s, "postsense_modality_quality_sum", modality="image") == pytest.approx(0.75)
    assert value(s, "postsense_modality_quality_count", modality="text") == 2
    assert value(s, "postsense_modality_quality_bucket", modality="image", le="0.3") == 1


def test_modality_states_are_counted_per_state_and_bounded() -> None:
    class ModalityState(Enum):  # like core.contracts.ModalityState
        OK = "ok"
        UNDECODABLE = "undecodable"

    m = Metrics()
    m.observe_modality_states("image", ["ok", ModalityState.OK, ModalityState.UNDECODABLE, "missing"])
    m.observe_modality_states("text", ["empty", "ok"])
    s = scrape(m)
    assert value(s, "postsense_modality_state_total", modality="image", state="ok") == 2
    assert value(s, "postsense_modality_state_total", modality="image", state="undecodable") == 1
    assert value(s, "postsense_modality_state_total", modality="image", state="missing") == 1
    assert value(s, "postsense_modality_state_total", modality="text", state="empty") == 1
    with pytest.raises(ValueError, match="unknown modality state 'corrupt'"):
        m.observe_modality_states("image", ["corrupt"])
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        m.observe_modality_states("audio", ["ok"])


def test_end_to_end_latency_uses_created_at_and_skips_unusable_timestamps() -> None:
    m = Metrics()
    published = 1767225600.0 + 2.0  # 2026-01-01T00:00:02Z
    observed = m.observe_end_to_end(
        [
            "2026-01-01T00:00:00Z",
            "2026-01-01T01:00:01.500+01:00",
            "2026-01-01T00:00:01",
            None,
            "yesterday",
            "2026-01-01T00:00:05Z",
        ],  # the last one is from the future (producer clock ahead): skipped
        published_at=published,
    )
    assert observed == 3
    s = scrape(m)
    assert value(s, "postsense_end_to_end_seconds_count") == 3
    assert value(s, "postsense_end_to_end_seconds_sum") == pytest.approx(2.0 + 0.5 + 1.0)


def test_consumer_lag_follows_the_assignment() -> None:
    m = Metrics()
    m.set_consumer_lag({("posts", 0): 10, ("posts", 1): 7})
    m.set_consumer_lag({("posts", 1): 4, ("posts", 2): -1})  # partition 0 revoked; a negative lag is a race
    s = scrape(m)
    lags = {x.labels["partition"]: x.value for x in s["postsense_consumer_lag_messages"]}
    assert lags == {"1": 4, "2": 0}
    m.set_consumer_lag({})
    assert "postsense_consumer_lag_messages" not in scrape(m)


def test_build_info_and_reference_gauges() -> None:
    m = Metrics()
    m.set_build_info("0.1.0", "offline", "v1", "cpu")
    m.set_build_info("0.1.0", "offline", "v2", "cuda:0")
    m.set_reference("text", queue_length=100, drift_sigmas=0.25)
    m.set_reference("text", acceptance_ratio=0.5, accepted=3)
    m.set_reference("text", accepted=2)
    s = scrape(m)
    [info] = s["postsense_build_info"]
    assert info.labels == {
        "version": "0.1.0",
        "model_name": "offline",
        "model_version": "v2",
        "device": "cuda:0",
    }
    assert info.value == 1
    assert value(s, "postsense_reference_queue_length", modality="text") == 100
    assert value(s, "postsense_reference_drift_sigmas", modality="text") == 0.25
    assert value(s, "postsense_reference_acceptance_ratio", modality="text") == 0.5
    assert value(s, "postsense_reference_accepted_total", modality="text") == 5
    with pytest.raises(ValueError, match="unknown rebalance event"):
        m.record_rebalance("moved")


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.abstained_total.inc()
    assert value(scrape(b), "postsense_abstained_total") == 0


def test_probes_report_readiness_and_failures() -> None:
    state = {"ready": False}

    def ready() -> bool:
        if state["ready"] is None:
            raise RuntimeError("model not loaded")
        return state["ready"]

    with MetricsServer(Metrics(), "127.0.0.1", 0, ready=ready) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/readyz")[0] == 503
        state["ready"] = True
        assert get(base + "/readyz") == (200, "text/plain; charset=utf-8", "ready\n")
        state["ready"] = None
        status, _, body = get(base + "/readyz")
        assert status == 503 and "RuntimeError: model not loaded" in body
        assert get(base + "/healthz")[0] == 200  # a failing check never takes the server down
        assert get(base + "/nope")[0] == 404


def test_liveness_check_is_pluggable() -> None:
    with MetricsServer(Metrics(), "127.0.0.1", 0, alive=lambda: False) as server:
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 503


def test_openmetrics_is_served_when_asked_for() -> None:
    with MetricsServer(Metrics(), "127.0.0.1", 0) as server:
        status, content_type, body = get(
            f"http://127.0.0.1:{server.port}/metrics", accept="application/openmetrics-text; version=1.0.0"
        )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_port_in_use_is_a_clear_error_and_close_frees_the_port() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    port = server.port
    with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
        MetricsServer(Metrics(), "127.0.0.1", port)
    server.close()
    server.close()  # idempotent
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_nan_quality_never_reaches_the_histogram_sum() -> None:
    m = Metrics()
    m.observe_prediction(
        FakePrediction([None], np.array([np.nan]), np.array([np.nan]), [None], np.array([True]))
    )
    s = scrape(m)
    assert not math.isnan(value(s, "postsense_modality_quality_sum", modality="image"))
    assert value(s, "postsense_modality_quality_count", modality="image") == 0
