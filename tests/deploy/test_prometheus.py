"""Alert rules, Prometheus config and the Grafana dashboard: valid for promtool, built only on exported metrics,
and each alert fires exactly in the situation its runbook describes (promtool rule unit tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    ALERTS,
    DASHBOARD,
    DEPLOY,
    alert_rules,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    exported_series,
)

# PromQL words that are not metric names.
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "inf",
    "nan",
    "atan2",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (scripts/system-deps does)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects.

    Strings, label matchers, range/offset durations and grouping label lists are removed first; what is
    left are identifiers, of which those called like functions and the keywords are not metrics.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr):
        word = match.group(1)
        if word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, pod) (rate(a_bucket{x=~"b|c", y!="rate(d)"}[5m] offset 1h)))'
        " / on (pod) group_left (z) max without (q) (up) > bool 2 * e_total unless sum(f)"
    ) == {"a_bucket", "up", "e_total", "f"}


def test_alert_rules_pass_promtool() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool() -> None:
    result = run_promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_use_only_exported_metrics_and_carry_runbooks() -> None:
    exported = exported_series()
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "PostsenseConsumerLagGrowing",
        "PostsenseNoOutput",
        "PostsenseDeadLetterRateHigh",
        "PostsenseMissingModalityRateJump",
        "PostsenseReferenceDrift",
        "PostsenseRedisUnavailable",
        "PostsenseTargetDown",
        "PostsenseAbsent",
        "PostsenseRestarting",
        "PostsenseLatencyHigh",
    }
    anchors = markdown_anchors(DEPLOY.parent / "docs" / "operations.md")
    for rule in rules:
        assert metric_names(rule["expr"]) <= exported, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page.endswith("/docs/operations.md"), rule["alert"]
        assert anchor in anchors and anchor.startswith(rule["alert"].lower()), (
            f"{rule['alert']}: no section #{anchor}"
        )


def markdown_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to dashes)."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in path.read_text().splitlines()
        if line.startswith("#")
    }


def test_dashboard_queries_parse_and_use_only_exported_metrics(tmp_path: Path) -> None:
    queries = dashboard_queries()
    exported = exported_series()
    for where, expr in queries:
        assert metric_names(expr), f"{where}: selects no metric"
        assert metric_names(expr) <= exported, f"{where}: {metric_names(expr) - exported} not exported"
    # promtool parses every expression as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_what_operators_read() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "consumer_group", "pod"} <= set(variables)
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    for needed in (
        "postsense_posts_consumed_total",
        "postsense_posts_published_total",
        "postsense_end_to_end_seconds_bucket",
        "postsense_batch_size_posts_bucket",
        "postsense_consumer_lag_messages",
        "postsense_posts_dead_lettered_total",
        "postsense_modality_state_total",
        "postsense_modality_quality_bucket",
        "postsense_reference_drift_sigmas",
        "up",
        "process_resident_memory_bytes",
        "process_start_time_seconds",  # replicas, memory, restarts
    ):
        assert needed in used, f"no panel shows {needed}"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'pod=~"$pod"' in target["expr"], f"{panel['title']} ignores the pod variable"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/postsense.yaml").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / mounts[dashboards_dir] / "postsense.json").resolve() == DASHBOARD.resolve()
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["url"].startswith("http://prometheus:")


# --- alert unit tests -------------------------------------------------------------------------------------

L = 'namespace="prod", consumer_group="postsense", pod="postsense-0"'
FIRING_LABELS = {"namespace": "prod", "consumer_group": "postsense"}
POD_LABELS = {**FIRING_LABELS, "pod": "postsense-0"}


def series(name: str, values: str, **extra: str) -> dict[str, str]:
    labels = L + "".join(f', {k}="{v}"' for k, v in extra.items())
    return {"series": f"{name}{{{labels}}}", "values": values}


# (alert, input series, eval time, labels of the firing alert or None when it must stay silent)
ALERT_CASES = [
    (
        "PostsenseConsumerLagGrowing",
        [series("postsense_consumer_lag_messages", "0+100x40", topic="posts", partition="0")],
        "30m",
        FIRING_LABELS,
    ),
    (
        "PostsenseConsumerLagGrowing",
        [series("postsense_consumer_lag_messages", "5000x40", topic="posts", partition="0")],
        "30m",
        None,
    ),  # large but steady: the group keeps up
    (
        "PostsenseNoOutput",
        [series("postsense_posts_consumed_total", "0+600x30", topic="posts")],
        "20m",
        FIRING_LABELS,
    ),
    (
        "PostsenseNoOutput",
        [
            series("postsense_posts_consumed_total", "0+600x30", topic="posts"),
            series("postsense_posts_published_total", "0+590x30", topic="sentiment"),
        ],
        "20m",
        None,
    ),
    (
        "PostsenseNoOutput",
        [series("postsense_posts_consumed_total", "100x30", topic="posts")],
        "20m",
        None,
    ),  # idle
    (
        "PostsenseDeadLetterRateHigh",
        [
            series("postsense_posts_consumed_total", "0+1000x30", topic="posts"),
            series("postsense_posts_dead_lettered_total", "0+100x30", reason="not_json"),
        ],
        "25m",
        FIRING_LABELS,
    ),
    (
        "PostsenseDeadLetterRateHigh",
        [
            series("postsense_posts_consumed_total", "0+1000x30", topic="posts"),
            series("postsense_posts_dead_lettered_total", "0+10x30", reason="not_json"),
        ],
        "25m",
        None,
    ),  # 1 %
    (
        "PostsenseCircuitBreakerOpen",
        [series("postsense_circuit_breaker_open", "0 0 1 0x10")],
        "8m",
        POD_LABELS,
    ),
    ("PostsenseCircuitBreakerOpen", [series("postsense_circuit_breaker_open", "0x10")], "8m", None),
    # 10 % of images missing for 6 h, then 50 %: fires; 10 % throughout: silent.
    (
        "PostsenseMissingModalityRateJump",
        [
            series("postsense_modality_state_total", "0+90x360 32400+50x60", modality="image", state="ok"),
            series(
                "postsense_modality_state_total", "0+10x360 3600+50x60", modality="image", state="missing"
            ),
        ],
        "405m",
        {**FIRING_LABELS, "modality": "image"},
    ),
    (
        "PostsenseMissingModalityRateJump",
        [
            series("postsense_modality_state_total", "0+90x420", modality="image", state="ok"),
            series("postsense_modality_state_total", "0+10x420", modality="image", state="missing"),
        ],
        "405m",
        None,
    ),
    (
        "PostsenseReferenceDrift",
        [series("postsense_reference_drift_sigmas", "0.1x10 0.8x60", modality="text")],
        "60m",
        {**FIRING_LABELS, "modality": "text"},
    ),
    (
        "PostsenseReferenceDrift",
        [series("postsense_reference_drift_sigmas", "0.3x70", modality="text")],
        "60m",
        None,
    ),
    ("PostsenseRedisUnavailable", [series("postsense_redis_up", "1 1 0x20")], "15m", POD_LABELS),
    (
        "PostsenseRedisUnavailable",
        [series("postsense_redis_up", "1 1 0 0 1x20")],
        "15m",
        None,
    ),  # a short blip
    ("PostsensePublishFailing", [series("postsense_publish_failures_total", "0 0+1x20")], "15m", POD_LABELS),
    ("PostsensePublishFailing", [series("postsense_publish_failures_total", "0x20")], "15m", None),
    # A pod whose /metrics stopped answering (crash loop, stuck loading the model): fires after 5 min; a blip does not.
    ("PostsenseTargetDown", [series("up", "1 1 0x20", job="postsense")], "15m", POD_LABELS),
    ("PostsenseTargetDown", [series("up", "1 1 0 0 1x20", job="postsense")], "15m", None),
    # No postsense target up at all (all down, or none left): fires; one of two pods up: silent.
    ("PostsenseAbsent", [series("up", "1 1 0x30", job="postsense")], "20m", {}),
    ("PostsenseAbsent", [series("up", "0x30", job="other")], "20m", {}),
    (
        "PostsenseAbsent",
        [
            series("up", "0x30", job="postsense"),
            {"series": 'up{job="postsense", pod="postsense-1"}', "values": "1x30"},
        ],
        "20m",
        None,
    ),
    # Three restarts in 30 minutes fire; one does not.
    (
        "PostsenseRestarting",
        [series("process_start_time_seconds", "100x5 400x5 700x5 1000x20", job="postsense")],
        "20m",
        POD_LABELS,
    ),
    (
        "PostsenseRestarting",
        [series("process_start_time_seconds", "100x5 400x30", job="postsense")],
        "20m",
        None,
    ),
    # p95 end-to-end between 60 s and 300 s for 15 minutes fires; everything under a second does not.
    (
        "PostsenseLatencyHigh",
        [
            series("postsense_end_to_end_seconds_bucket", "0x40", le="1"),
            series("postsense_end_to_end_seconds_bucket", "0+1x40", le="60"),
            series("postsense_end_to_end_seconds_bucket", "0+10x40", le="300"),
            series("postsense_end_to_end_seconds_bucket", "0+10x40", le="+Inf"),
        ],
        "30m",
        FIRING_LABELS,
    ),
    (
        "PostsenseLatencyHigh",
        [
            series("postsense_end_to_end_seconds_bucket", "0+10x40", le=le)
            for le in ("1", "60", "300", "+Inf")
        ],
        "30m",
        None,
    ),
]


@pytest.mark.parametrize(
    ("alert", "input_series", "eval_time", "labels"),
    ALERT_CASES,
    ids=[f"{c[0]}-{'fires' if c[3] is not None else 'silent'}-{i}" for i, c in enumerate(ALERT_CASES)],
)
def test_alert_fires_when_and_only_when_expected(
    tmp_path: Path,
    alert: str,
    input_series: list[dict[str, str]],
    eval_time: str,
    labels: dict[str, str] | None,
) -> None:
    # promtool compares annotations verbatim; they are prose (checked above), so the unit test runs the rules
    # without them and asserts on what decides paging: expression, `for` and labels.
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(doc))
    severity = next(r["labels"]["severity"] for r in alert_rules() if r["alert"] == alert)
    expected = [] if labels is None else [{"exp_labels": {**labels, "severity": severity}}]
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": expected}],
            }
        ],
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
