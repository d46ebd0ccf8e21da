"""Message contracts: the input post, the sentiment record and the dead-letter record, and input limits.

The JSON Schemas in ``core/schemas/`` are the contract users code against; this module validates
against exactly those files, so the schema and the code cannot drift apart. It sits in ``core``, the
bottom layer, because the training data readers parse the same posts the service consumes, and the
connectors (media limits, producer request size) share its ``Limits``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any, Literal, NoReturn

import fastjsonschema
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
SCHEMA_FILES = {
    "post": "post.v1.json",
    "sentiment": "sentiment.v1.json",
    "dead_letter": "dead_letter.v1.json",
}
DEAD_LETTER_HEADER = "postsense.dlq"
#: The record's names of the fusion terms: the three of (12) (core.drf.head.EXPANSIONS), then the specialist terms.
FUSION_TERMS = ("intact", "image_recovered_text", "recovered_image_text", "image_alone", "text_alone")


@cache
def schema(name: str) -> dict[str, Any]:
    """The checked-in JSON Schema ``name`` (post, sentiment, dead_letter)."""
    text = resources.files("core.schemas").joinpath(SCHEMA_FILES[name]).read_text()
    return json.loads(text)


@cache
def validator(name: str) -> Draft202012Validator:
    checker = Draft202012Validator.FORMAT_CHECKER
    # jsonschema drops a format whose optional checker is not installed, silently accepting anything for it.
    if "date-time" not in checker.checkers:
        raise ImportError(
            "format date-time is not enforced: install rfc3339-validator (a postsense dependency)"
        )
    return Draft202012Validator(schema(name), format_checker=checker)


@cache
def conformance_check(name: str) -> Callable[[Any], Any]:
    """The same schema file compiled to Python code (fastjsonschema): it raises ``JsonSchemaException`` on a
    document that does not conform and says little about why; ``validator`` explains a rejection. Every post is
    checked, and on a bench post (a 50 KB photo in base64) this costs about a sixth of jsonschema's walk
    (tests/core/test_contracts.py holds the two to the same verdicts)."""
    from rfc3339_validator import validate_rfc3339  # the date-time checker jsonschema's FORMAT_CHECKER uses

    return fastjsonschema.compile(schema(name), formats={"date-time": validate_rfc3339}, use_default=False)


def conforms(name: str, doc: Any) -> bool:
    """Whether ``doc`` conforms to schema ``name`` (the fast check; same verdict as ``validator``)."""
    try:
        conformance_check(name)(doc)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


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


#: The two modalities of a post, in the order every per-modality table and metric uses.
Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")


class ModalityState(str, Enum):
    """The output contract's state of one modality of a post (image or text)."""

    ok = "ok"
    missing = "missing"
    empty = "empty"
    undecodable = "undecodable"


class Limits(BaseModel):
    """Bounds on untrusted input (the ``limits`` settings section); past them a record is a dead letter or a
    modality gets a state with a reason, never an out-of-memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_record_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_text_chars: int = Field(10_000, ge=1)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    max_metadata_depth: int = Field(16, ge=1)
    max_metadata_bytes: int = Field(64 * 1024, ge=0)


#: The limits of a default configuration (frozen, so safe to share).
DEFAULT_LIMITS = Limits()


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


class NonFiniteNumber(ValueError):
    """A JSON number that is not finite: ``NaN``, ``Infinity``, ``-Infinity`` or one past the float range."""


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e400 is valid JSON, but as a float it is inf
        raise NonFiniteNumber(f"{token[:40]} overflows a 64-bit float to infinity")
    return value


def _no_constant(token: str) -> NoReturn:
    raise NonFiniteNumber(f"{token} is not a JSON number (RFC 8259 has no NaN or Infinity)")


def loads_finite(text: str | bytes) -> Any:
    """``json.loads`` that raises :class:`NonFiniteNumber` where Python's parser would accept ``NaN``,
    ``Infinity`` or a number that overflows to infinity (strict JSON parsers reject what those become)."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` for everything postsense publishes: a non-finite float raises ValueError instead of
    writing a bare ``NaN``/``Infinity`` token that strict JSON parsers reject."""
    return json.dumps(value, allow_nan=False, **kwargs)


def parse_post(raw: bytes | None, limits: Limits = DEFAULT_LIMITS) -> Post | Invalid:
    """Turn a record value into a Post, or say why it is not one. Never raises."""
    if raw is None:
        return Invalid("empty_value", "Tombstone", "record value is null")
    if len(raw) > limits.max_record_bytes:
        return Invalid("too_large", "RecordTooLarge", f"{len(raw)} bytes > limit {limits.max_record_bytes}")
    try:
        text = raw.decode(
            "utf-8"
        )  # RFC 8259: JSON between systems is UTF-8 (json.loads would guess UTF-16/32)
    except UnicodeDecodeError as exc:
        return Invalid("not_utf8", type(exc).__name__, str(exc)[:200])
    try:
        doc = loads_finite(text)
    except RecursionError:
        return Invalid("too_deep", "RecursionError", "JSON nesting exceeds the parser's limit")
    except NonFiniteNumber as exc:
        return Invalid("non_finite_number", type(exc).__name__, str(exc)[:200])
    except ValueError as exc:
        return Invalid("not_json", type(exc).__name__, str(exc)[:200])
    if not isinstance(doc, dict):
        return Invalid(
            "schema_invalid", "ValidationError", f"top level is {type(doc).__name__}, expected object"
        )
    metadata = doc.get("metadata")
    if metadata is not None:
        if _depth(metadata, limits.max_metadata_depth) > limits.max_metadata_depth:
            return Invalid(
                "metadata_too_deep",
                "ValidationError",
                f"metadata nested deeper than {limits.max_metadata_depth}",
            )
        if len(dumps_strict(metadata)) > limits.max_metadata_bytes:
            return Invalid(
                "metadata_too_large",
                "ValidationError",
                f"metadata larger than {limits.max_metadata_bytes} bytes",
            )
    # Valid posts take the fast check only; jsonschema walks the document again to say what is wrong.
    error = (
        None
        if conforms("post", doc)
        else next(iter(sorted(validator("post").iter_errors(doc), key=lambda e: list(e.path))), None)
    )
    if error is not None:
        where = "/".join(str(p) for p in error.path) or "(root)"
        return Invalid("schema_invalid", "ValidationError", f"{where}: {error.message}"[:1024])
    for name in ("id", "text"):  # the two strings the service encodes (record key, tokenizer)
        value = doc.get(name)
        if isinstance(value, str) and not _utf8_encodable(value):
            return Invalid(
                "not_utf8",
                "UnicodeEncodeError",
                f"{name} holds an unpaired surrogate escape (\\ud800-\\udfff)",
            )
    post_text = doc.get("text")
    truncated = False
    if post_text is not None and len(post_text) > limits.max_text_chars:
        post_text, truncated = post_text[: limits.max_text_chars], True
    return Post(
        id=doc["id"],
        text=post_text,
        image=doc.get("image"),
        created_at=doc.get("created_at"),
        metadata=metadata,
        text_truncated=truncated,
    )


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
            (DEAD_LETTER_HEADER, dumps_strict(doc).encode()),
            ("postsense.reason", self.reason.encode()),
        ]


@dataclass(frozen=True)
class ModalityReport:
    """What the sentiment record says about one modality: its state, why, and its quality (NaN when absent)."""

    state: ModalityState
    reason: str | None
    quality: float

    def document(self) -> dict[str, Any]:
        # A quality is published only for a present modality: q is a probability density, capped at 1.
        ok = self.state is ModalityState.ok and math.isfinite(self.quality) and self.quality > 0
        return {
            "state": self.state.value,
            "reason": self.reason,
            "quality": min(self.quality, 1.0) if ok else None,
        }


def sentiment_document(
    post: Post,
    *,
    source: tuple[str, int, int],
    label: str | None,
    probabilities: dict[str, float] | None,
    image: ModalityReport,
    text: ModalityReport,
    recovered: str | None,
    fusion_weights: Sequence[float],
    model: tuple[str, str],
    processed_at: str,
    calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The sentiment record of one post (``core/schemas/sentiment.v1.json``).

    ``probabilities`` None means the model abstained (no usable modality): then no label either, since an
    abstention's softmax is the classifier bias, not evidence. ``source`` is (topic, partition, offset).
    ``calibration`` says how the probabilities were calibrated (``Predictor.calibration``; None: not at all).
    """
    abstained = probabilities is None
    weights = [float(w) for w in fusion_weights]
    if len(weights) not in (3, len(FUSION_TERMS)):
        raise ValueError(f"fusion_weights: 3 or {len(FUSION_TERMS)} weights, got {len(weights)}")
    topic, partition, offset = source
    return {
        "schema_version": SCHEMA_VERSION,
        "id": post.id,
        "label": None if abstained else label,
        "probabilities": probabilities,
        "abstained": abstained,
        "modalities": {"image": image.document(), "text": text.document()},
        "recovered": recovered,
        "fusion_weights": dict(zip(FUSION_TERMS[: len(weights)], weights, strict=True)),
        "model": {"name": model[0], "version": model[1]},
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "event_time": post.created_at,
        "processed_at": processed_at,
        "metadata": post.metadata,
        "text_truncated": post.text_truncated,
        "calibration": None if calibration is None else dict(calibration),
    }
