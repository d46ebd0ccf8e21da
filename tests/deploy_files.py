"""The checked-in deploy files as the tests read them (no tests here): the alert rules, the Grafana dashboard's
queries and the metric list, shared by the static checks and the live-Prometheus scrape test."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "postsense.json"

# Values Grafana substitutes for the dashboard's variables when it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$consumer_group": ".*", "$pod": ".*"}

#: Series Prometheus itself records for every scrape target (the alerts for a pod that exports nothing read it).
SCRAPE_SERIES = {"up"}


def exported_series() -> set[str]:
    """Series names a PromQL query may use: deploy/metrics.txt, histograms expanded to their three series, and `up`."""
    names = set(SCRAPE_SERIES)
    for line in (DEPLOY / "metrics.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind, _ = line.split()
            names.update(
                {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
            )
    return names


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.extend([panel, *panel.get("panels", [])])
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    for var, value in variables.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


def dashboard_queries(variables: dict[str, str] = GRAFANA_VARIABLES) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL as Grafana sends it) for every panel target and variable query.

    A variable query ``label_values(selector, label)`` contributes its selector.
    """
    queries = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} / {target['refId']}", substitute(target["expr"], variables)))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert inner, f"variable {var['name']}: expected label_values(selector, label)"
            queries.append((f"variable {var['name']}", substitute(inner.group(1), variables)))
    return queries
