"""Contract fixes a new user hit: created_at must be an RFC 3339 date-time, and a truncated text says so."""

from __future__ import annotations

import json

import pytest
from stream_support import LABELS

from connectors.metrics import Metrics
from core.contracts import Invalid, Post, parse_post, validator
from core.inference import Predictor
from core.model import create_model
from stream.processor import BatchProcessor, Record, validate
from stream.settings import load_settings


@pytest.mark.parametrize(
    "created_at", ["yesterday", "2026-11-23", "2026-11-23 12:00", "2026-13-01T00:00:00Z"]
)
def test_a_created_at_that_is_not_a_date_time_is_schema_invalid(created_at: str) -> None:
    parsed = parse_post(json.dumps({"id": "1", "text": "hi", "created_at": created_at}).encode())
    assert isinstance(parsed, Invalid) and parsed.reason == "schema_invalid", parsed
    assert "created_at" in parsed.detail


@pytest.mark.parametrize("created_at", ["2026-11-23T12:00:00Z", "2026-11-23T12:00:00.123+02:00", None])
def test_rfc3339_created_at_and_null_are_accepted(created_at: str | None) -> None:
    assert isinstance(parse_post(json.dumps({"id": "1", "created_at": created_at}).encode()), Post)


def test_date_time_is_enforced_in_both_contracts_not_skipped() -> None:
    for name in ("post", "sentiment"):
        assert "date-time" in validator(name).format_checker.checkers


def test_a_truncated_text_is_flagged_in_the_record_and_counted() -> None:
    settings = load_settings(None, {"limits": {"max_text_chars": 50}})
    metrics = Metrics()
    processor = BatchProcessor(settings, Predictor.from_model(create_model("tiny", labels=LABELS)), metrics)
    posts = []
    for offset, text in enumerate(["short", "x" * 5000]):
        record = Record("posts", 0, offset, None, json.dumps({"id": str(offset), "text": text}).encode())
        post = validate(record, processor.limits)
        assert isinstance(post, Post)
        posts.append(processor.decode(record, post))
    documents = processor.process(posts, []).documents
    assert [d["text_truncated"] for d in documents] == [False, True]
    for doc in documents:
        assert not list(validator("sentiment").iter_errors(doc))
    assert metrics.registry.get_sample_value("postsense_text_truncated_total") == 1
