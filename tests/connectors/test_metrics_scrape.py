"""End to end: `postsense serve` against the real broker and Redis, scraped by a real Prometheus server that also
loads the alert rules; every dashboard query must return data, every rule must evaluate cleanly."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import ALERTS, alert_rules, dashboard_queries, exported_series
from stream_support import cli, produce, stream_settings, valid_posts

from stream.local_services import free_port
from stream.settings import Settings

pytestmark = [pytest.mark.services, pytest.mark.slow]

NAMESPACE, POD = "itest", "postsense-0"
WAVES = 3  # counters must grow across several 1 s scrapes for rate() to see them
INVALID_PER_WAVE, ABSTAINING_PER_WAVE = 2, 1


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(check: Any, what: str, timeout_s: float, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"{what}: process exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}"
            )
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


class Prometheus:
    """A real Prometheus server on a free loopback port with its own config and data directory."""

    def __init__(self, workdir: Path, target: str, group: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "prometheus not found: install Debian's prometheus package (scripts/system-deps does)"
            )
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "postsense",
                    # The labels the ServiceMonitor (Kubernetes) or the compose config add to every series.
                    "static_configs": [
                        {
                            "targets": [target],
                            "labels": {"namespace": NAMESPACE, "consumer_group": group, "pod": POD},
                        }
                    ],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(
            lambda: urllib.request.urlopen(self.url + "/-/ready", timeout=1).status == 200,
            "prometheus ready",
            30,
            self.proc,
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = http_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wave(i: int) -> list[bytes]:
    """Valid posts with every modality case, one with no modality at all, and records that are not posts."""
    posts = valid_posts(10, prefix=f"w{i}-") + [{"id": f"w{i}-none", "created_at": "2026-11-23T12:00:00Z"}]
    return [json.dumps(p).encode() for p in posts] + [b"{not json", b"[1, 2]"]


def settled(prometheus: Prometheus, group: str, sent: int) -> bool:
    """Prometheus has scraped the end state of the traffic: every record published or dead-lettered, no lag."""

    def total(expr: str) -> float:
        return sum(float(r["value"][1]) for r in prometheus.query(expr))

    sel = f'consumer_group="{group}"'
    lag = prometheus.query(f"postsense_consumer_lag_messages{{{sel}}}")
    return (
        total(f"postsense_posts_published_total{{{sel}}}") == sent - WAVES * INVALID_PER_WAVE
        and total(f"postsense_posts_dead_lettered_total{{{sel}}}") == WAVES * INVALID_PER_WAVE
        and len(lag) == 2
        and all(float(r["value"][1]) == 0 for r in lag)
    )


def rules_evaluated_since(prometheus: Prometheus, since: datetime) -> bool:
    """Every alert rule has been evaluated after ``since``."""
    groups = http_json(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
    evaluated = [rule["lastEvaluation"] for group in groups for rule in group["rules"]]
    # RFC 3339 with up to nanoseconds; datetime takes microseconds.
    times = [
        datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", t).replace("Z", "+00:00")) for t in evaluated
    ]
    return len(times) == len(alert_rules()) and all(t > since for t in times)


@pytest.fixture(scope="module")
def scraped(
    services: Any,
    names: Callable[[str], str],
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Prometheus, Settings, int]]:
    """A serve process that handled WAVES waves of traffic while Prometheus scraped it every second."""
    workdir = tmp_path_factory.mktemp("prometheus")
    settings = stream_settings(services, names, partitions=2, batch={"max_posts": 8, "max_wait_ms": 50})
    metrics_port = free_port()
    serve = subprocess.Popen(
        cli(settings, "serve", checkpoint=tiny_checkpoint, metrics_port=metrics_port),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
    )
    prometheus = None
    try:
        prometheus = Prometheus(workdir, f"127.0.0.1:{metrics_port}", settings.kafka.group_id)
        wait_for(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1).status == 200
            ),
            "serve ready (model loaded, partitions assigned)",
            90,
            serve,
        )
        consumed = f'sum(postsense_posts_consumed_total{{consumer_group="{settings.kafka.group_id}"}})'
        sent = 0
        for i in range(WAVES):
            records = wave(i)
            produce(settings, records)
            sent += len(records)
            # Each wave lands in its own scrapes, so the counters grow across several samples (rate() needs two).
            wait_for(
                lambda sent=sent: (r := prometheus.query(consumed)) and float(r[0]["value"][1]) >= sent,
                f"prometheus to see all {sent} records consumed",
                60,
                serve,
            )
        wait_for(
            lambda: settled(prometheus, settings.kafka.group_id, sent),
            "prometheus to scrape the final counts",
            60,
            serve,
        )
        since = datetime.now(UTC)
        wait_for(
            lambda: rules_evaluated_since(prometheus, since),
            "every rule evaluated on the final counts",
            30,
            serve,
        )
        yield prometheus, settings, sent
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
        if prometheus is not None:
            prometheus.close()


def test_every_dashboard_query_returns_data_from_the_running_service(
    scraped: tuple[Prometheus, Settings, int],
) -> None:
    prometheus, settings, _ = scraped
    variables = {
        "$__rate_interval": "1m",
        "$namespace": NAMESPACE,
        "$consumer_group": settings.kafka.group_id,
        "$pod": POD,
    }
    empty, all_nan = [], []
    for where, expr in dashboard_queries(variables):
        result = prometheus.query(expr)
        if not result:
            empty.append(where)
        elif all(math.isnan(float(r["value"][1])) for r in result):
            all_nan.append(where)
    assert not empty, f"queries without data: {empty}"
    assert not all_nan, f"queries with only NaN: {all_nan}"


def test_counts_seen_by_prometheus_match_the_traffic(scraped: tuple[Prometheus, Settings, int]) -> None:
    prometheus, settings, sent = scraped
    sel = f'consumer_group="{settings.kafka.group_id}"'

    def total(expr: str) -> dict[str, float]:
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in prometheus.query(expr)}

    dead = total(f"sum by (reason) (postsense_posts_dead_lettered_total{{{sel}}})")
    assert sum(dead.values()) == WAVES * INVALID_PER_WAVE
    assert {json.loads(k)["reason"] for k in dead} == {"not_json", "schema_invalid"}
    [published] = total(f"sum(postsense_posts_published_total{{{sel}}})").values()
    assert published == sent - WAVES * INVALID_PER_WAVE
    [abstained] = total(f"sum(postsense_abstained_total{{{sel}}})").values()
    assert abstained == WAVES * ABSTAINING_PER_WAVE
    states = total(f"sum by (modality) (postsense_modality_state_total{{{sel}}})")
    assert sorted(states.values()) == [published, published]  # one state per modality per published post
    # All input consumed and committed: the owner of each partition reports zero lag.
    lag = total(f"postsense_consumer_lag_messages{{{sel}}}")
    assert len(lag) == 2 and set(lag.values()) == {0.0}
    assert total(f"postsense_build_info{{{sel}}}"), "build_info not set"


def test_only_listed_metrics_reach_prometheus(scraped: tuple[Prometheus, Settings, int]) -> None:
    prometheus, _, _ = scraped
    names = set(http_json(f"{prometheus.url}/api/v1/label/__name__/values")["data"])
    ours = {n for n in names if n.startswith("postsense_")}
    assert ours and ours <= exported_series(), ours - exported_series()


def test_alert_rules_evaluate_without_errors_on_live_data(scraped: tuple[Prometheus, Settings, int]) -> None:
    prometheus, _, _ = scraped
    groups = http_json(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(alert_rules())
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        assert rule["lastEvaluation"] != "0001-01-01T00:00:00Z", f"{rule['name']} never evaluated"
    # A healthy short run pages nobody.
    firing = [
        a["labels"]["alertname"] for rule in rules for a in rule.get("alerts", []) if a["state"] == "firing"
    ]
    assert not firing, firing
