"""Message contracts: the input post, the sentiment record and the dead-letter record.

The JSON Schemas in ``stream/schemas/`` are the contract users code against; this module
validates against exactly those files, so the schema and the code cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_VERSION = 1
SCHEMA_FILES = {"post": "post.v1.json", "sentiment": "sentiment.v1.json", "dead_letter": "dead_letter.v1.json"}
DEAD_LETTER_HEADER = "postsense.dlq"


@cache
def schema(name: str) -> dict[str, Any]:
    """The checked-in JSON Schema ``name`` (post, sentiment, dead_letter)."""
    text = resources.files("stream.schemas").joinpath(SCHEMA_FILES[name]).read_text()
    return json.loads(text)


@cache
def validator(name: str) -> Draft202012Validator:
    checker = Draft202012Validator.FORMAT_CHECKER
    # jsonschema drops a format whose optional checker is not installed, silently accepting anything for it.
    if "date-time" not in checker.checkers:
        raise ImportError("format date-time is not enforced: install rfc3339-validator (a postsense dependency)")
    return Draft202012Validator(schema(name), format_checker=checker)


@dataclass(frozen=True)
class Post:
    """A valid input post. ``text`` is None when absent or null; ``image`` is the raw image field."""

    id: str
    text: str | None
    image: dict[str, str] | None
    created_at: str | None
    metadata: dict[str, Any] | None
    text_truncated: bool = False


@dataclass(frozen=True)
class Invalid:
    """Why a record is not a post: becomes a dead-letter record with the original bytes."""

    reason: str
    error_class: str
    detail: str | None = None


@dataclass(frozen=True)
class Limits:
    max_record_bytes: int = 16 * 1024 * 1024
    max_text_chars: int = 10_000
    max_metadata_depth: int = 16
    max_metadata_bytes: int = 64 * 1024


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping early once past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def _utf8_encodable(value: str) -> bool:
    """False for a string with a lone surrogate: valid JSON (``"\\ud800"``) but not encodable as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_post(raw: bytes | None, limits: Limits = Limits()) -> Post | Invalid:
    """Turn a record value into a Post, or say why it is not one. Never raises."""
    if raw is None:
        return Invalid("empty_value", "Tombstone", "record value is null")
    if len(raw) > limits.max_record_bytes:
        return Invalid("too_large", "RecordTooLarge", f"{len(raw)} bytes > limit {limits.max_record_bytes}")
    try:
        text = raw.decode("utf-8")  # RFC 8259: JSON between systems is UTF-8 (json.loads would guess UTF-16/32)
    except UnicodeDecodeError as exc:
        return Invalid("not_utf8", type(exc).__name__, str(exc)[:200])
    try:
        doc = json.loads(text)
    except RecursionError:
        return Invalid("too_deep", "RecursionError", "JSON nesting exceeds the parser's limit")
    except ValueError as exc:
        return Invalid("not_json", type(exc).__name__, str(exc)[:200])
    if not isinstance(doc, dict):
        return Invalid("schema_invalid", "ValidationError", f"top level is {type(doc).__name__}, expected object")
    metadata = doc.get("metadata")
    if metadata is not None:
        if _depth(metadata, limits.max_metadata_depth) > limits.max_metadata_depth:
            return Invalid("metadata_too_deep", "ValidationError", f"metadata nested deeper than {limits.max_metadata_depth}")
        if len(json.dumps(metadata)) > limits.max_metadata_bytes:
            return Invalid("metadata_too_large", "ValidationError", f"metadata larger than {limits.max_metadata_bytes} bytes")
    error = next(iter(sorted(validator("post").iter_errors(doc), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.path) or "(root)"
        return Invalid("schema_invalid", "ValidationError", f"{where}: {error.message}"[:1024])
    for name in ("id", "text"):  # the two strings the service encodes (record key, tokenizer)
        value = doc.get(name)
        if isinstance(value, str) and not _utf8_encodable(value):
            return Invalid("not_utf8", "UnicodeEncodeError", f"{name} holds an unpaired surrogate escape (\\ud800-\\udfff)")
    text = doc.get("text")
    truncated = text is not None and len(text) > limits.max_text_chars
    if truncated:
        text = text[: limits.max_text_chars]
    return Post(
        id=doc["id"],
        text=text,
        image=doc.get("image"),
        created_at=doc.get("created_at"),
        metadata=metadata,
        text_truncated=truncated,
    )


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class DeadLetter:
    """A dead-letter record: the original key and value untouched, the reason in a header."""

    key: bytes | None
    value: bytes | None
    reason: str
    error_class: str
    detail: str | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    failed_at: str = field(default_factory=utc_now_iso)

    def document(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "reason": self.reason,
            "error_class": self.error_class,
            "detail": self.detail,
            "source": {
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "timestamp_ms": self.timestamp_ms,
            },
            "failed_at": self.failed_at,
        }

    def headers(self) -> list[tuple[str, bytes]]:
        doc = self.document()
        return [
            (DEAD_LETTER_HEADER, json.dumps(doc).encode()),
            ("postsense.reason", self.reason.encode()),
        ]
