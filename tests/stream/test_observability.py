"""Signals that must not go silent: process metrics on the service's own registry, structured JSON logs."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.logs import setup_logging
from connectors.metrics import Metrics
from core.contracts import Invalid
from stream.processor import Record, dead_letter


def test_the_service_registry_exports_this_process_memory_cpu_and_start_time() -> None:
    body, _ = Metrics().exposition()
    samples = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    with open(f"/proc/{os.getpid()}/status") as fh:
        rss_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    assert samples["process_resident_memory_bytes"] == pytest.approx(rss_kib * 1024, rel=0.2)
    assert samples["process_cpu_seconds_total"] > 0
    assert samples["process_start_time_seconds"] > 1.7e9
    assert any(name.startswith("python_gc_collections") for name in samples)


@pytest.fixture
def json_logs():
    """The service's JSON log setup, writing into a buffer; yields a function returning the lines as dicts."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("INFO", json_logs=True)
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers[:], level = saved
    root.setLevel(level)


def test_json_logs_carry_the_records_coordinates_and_reason_as_fields(json_logs) -> None:
    record = Record("posts", 3, 1234, b"post-77", b"not json")
    dead_letter(record, Invalid("not_json", "JSONDecodeError", "Expecting value"), "posts.dlq", 1 << 20)
    [line] = [doc for doc in json_logs() if doc["logger"] == "stream.processor"]
    assert line["level"] == "INFO" and "not_json" in line["message"]
    assert {k: line[k] for k in ("topic", "partition", "offset", "reason", "error_class", "post_id")} == {
        "topic": "posts",
        "partition": 3,
        "offset": 1234,
        "reason": "not_json",
        "error_class": "JSONDecodeError",
        "post_id": "post-77",
    }


def test_json_logs_without_fields_stay_a_plain_message(json_logs) -> None:
    logging.getLogger("stream.test").warning("hello %s", "there")
    doc = json_logs()[-1]
    assert set(doc) == {"time", "level", "logger", "message"} and doc["message"] == "hello there"
