import base64
import json

import pytest

from core.contracts import (
    DEAD_LETTER_HEADER,
    DeadLetter,
    Invalid,
    Limits,
    Post,
    conforms,
    parse_post,
    validator,
)


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


GOOD = [
    {"id": "1", "text": "hello", "image": {"base64": base64.b64encode(b"xx").decode()}},
    {"id": "2", "text": None, "image": {"url": "https://example.com/a.jpg"}},
    {"id": "3", "image": {"path": "a/b.jpg"}, "created_at": "2026-11-23T12:00:00Z"},
    {"id": "4", "text": "", "image": None, "metadata": {"lang": "en", "tags": [1, 2]}},
    {"id": "5"},  # neither modality: valid, answered with an abstention
    {"schema_version": 1, "id": "6", "text": "x"},
]


@pytest.mark.parametrize("doc", GOOD)
def test_good_posts_parse(doc):
    post = parse_post(raw(doc))
    assert isinstance(post, Post), post
    assert post.id == doc["id"]
    assert post.text == doc.get("text")
    assert post.image == doc.get("image")


@pytest.mark.parametrize(
    "value, reason, needle",
    [
        (b"not json", "not_json", None),
        (b"\xff\xfe\x00garbage", "not_utf8", None),
        (b"[1, 2]", "schema_invalid", "expected object"),
        (raw({"text": "no id"}), "schema_invalid", "'id' is a required property"),
        (raw({"id": 5, "text": "x"}), "schema_invalid", "is not of type 'string'"),
        (raw({"id": "", "text": "x"}), "schema_invalid", "id"),
        (raw({"id": "1", "text": 3}), "schema_invalid", "text"),
        (raw({"id": "1", "image": {"ftp": "x"}}), "schema_invalid", "image"),
        (raw({"id": "1", "image": {"url": "u", "base64": "x"}}), "schema_invalid", "image"),
        (raw({"id": "1", "image": "data:..."}), "schema_invalid", "image"),
        (raw({"id": "1", "extra": 1}), "schema_invalid", "Additional properties"),
        (raw({"id": "1", "schema_version": 2}), "schema_invalid", "schema_version"),
        (None, "empty_value", None),
    ],
)
def test_bad_posts_are_invalid_with_reason(value, reason, needle):
    out = parse_post(value)
    assert isinstance(out, Invalid)
    assert out.reason == reason
    if needle:
        assert needle in (out.detail or "")


@pytest.mark.parametrize(
    "value, needle",
    [
        (b'{"id": "1", "text": "t", "metadata": {"score": NaN}}', "NaN"),
        (b'{"id": "1", "metadata": {"scores": [1.5, Infinity]}}', "Infinity"),
        (b'{"id": "1", "metadata": {"a": {"b": -Infinity}}}', "-Infinity"),
        (b'{"id": "1", "metadata": {"views": 1e400}}', "1e400"),  # json.loads reads it as inf
        (b'{"id": "1", "metadata": {"views": -2.5E+999}}', "-2.5E+999"),
        (b'{"id": "1", "extra": NaN}', "NaN"),  # anywhere in the post, before the schema is checked
    ],
)
def test_non_finite_numbers_anywhere_make_the_record_invalid(value, needle):
    assert json.loads(value)  # Python's own parser takes them: the service must not
    out = parse_post(value)
    assert isinstance(out, Invalid) and out.reason == "non_finite_number", out
    assert needle in (out.detail or "")


# Documents where a schema checker can slip: bool against const 1, date-time edge cases, lengths counted in code points.
BORDERLINE = [
    {"id": "1", "schema_version": True},
    {"id": "1", "schema_version": 1.0},
    {"id": "1", "schema_version": "1"},
    {"id": "1", "created_at": "2024-01-01 00:00:00Z"},
    {"id": "1", "created_at": "2024-13-01T00:00:00Z"},
    {"id": "1", "created_at": "2024-02-29T23:59:60+01:00"},
    {"id": "1", "created_at": None},
    {"id": "1", "metadata": []},
    {"id": "1", "metadata": None},
    {"id": "\U0001f600" * 256},
    {"id": "\U0001f600" * 257},
    {"id": "1", "image": {}},
    {"id": "1", "image": {"base64": None}},
    {"id": "1", "image": {"url": ""}},
    {"id": "1", "image": {"path": "p", "extra": 1}},
    {"id": "1", "text": ["a"]},
    {"id": None},
]


@pytest.mark.parametrize("doc", GOOD + BORDERLINE)
def test_the_fast_schema_check_agrees_with_jsonschema(doc):
    """Only a rejected post is walked by jsonschema again: the fast check must never accept what it would refuse."""
    assert conforms("post", doc) == validator("post").is_valid(doc)


def test_finite_extremes_and_large_integers_are_still_posts():
    post = parse_post(b'{"id": "1", "metadata": {"a": 1e308, "b": -1e-400, "c": 1' + b"0" * 400 + b"}}")
    assert isinstance(post, Post), post
    assert post.metadata == {"a": 1e308, "b": -0.0, "c": 10**400}
    assert json.loads(json.dumps(post.metadata, allow_nan=False)) == post.metadata


def test_limits_on_size_text_and_metadata():
    assert parse_post(b"x" * 2048, Limits(max_record_bytes=1024)).reason == "too_large"
    long = parse_post(raw({"id": "1", "text": "a" * 50}), Limits(max_text_chars=10))
    assert isinstance(long, Post) and long.text == "a" * 10 and long.text_truncated
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    assert parse_post(raw({"id": "1", "metadata": deep})).reason == "metadata_too_deep"
    # deeper than the JSON parser itself allows: still an Invalid, not a crash
    assert parse_post(b'{"id":"1","metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}").reason in (
        "too_deep",
        "metadata_too_deep",
    )


def test_dead_letter_keeps_original_bytes_and_validates():
    original = b"\x00\x01 not a post"
    dl = DeadLetter(
        key=b"k",
        value=original,
        reason="not_json",
        error_class="JSONDecodeError",
        detail="Expecting value",
        topic="posts",
        partition=3,
        offset=41,
        timestamp_ms=1,
    )
    assert dl.value is original
    header = dict(dl.headers())[DEAD_LETTER_HEADER]
    validator("dead_letter").validate(json.loads(header))


def test_output_schema_accepts_an_abstention_and_rejects_quality_zero():
    record = {
        "schema_version": 1,
        "id": "p",
        "label": None,
        "probabilities": None,
        "abstained": True,
        "modalities": {
            "image": {"state": "missing", "reason": None, "quality": None},
            "text": {"state": "empty", "reason": None, "quality": None},
        },
        "recovered": None,
        "fusion_weights": {"intact": 0.0, "image_recovered_text": 0.0, "recovered_image_text": 0.0},
        "model": {"name": "drf-offline", "version": "v1"},
        "source": {"topic": "posts", "partition": 0, "offset": 0},
        "event_time": None,
        "processed_at": "2026-11-23T12:00:00.000Z",
        "metadata": None,
    }
    validator("sentiment").validate(record)
    record["modalities"]["image"] = {"state": "ok", "reason": None, "quality": 0.0}
    assert not validator("sentiment").is_valid(record)


@pytest.mark.parametrize("count", [3, 5])
def test_sentiment_record_names_every_fusion_term_of_the_model(count):
    """Three terms of (12) from a head without specialist terms (older checkpoints), five from one with them; both
    are valid records, and a weight vector of any other length is a bug, refused rather than silently cut."""
    from core.contracts import FUSION_TERMS, ModalityReport, ModalityState, sentiment_document

    post = parse_post(raw(GOOD[0]), Limits())
    assert isinstance(post, Post)
    fields = dict(
        source=("posts", 0, 7),
        label="positive",
        probabilities={"negative": 0.1, "neutral": 0.2, "positive": 0.7},
        image=ModalityReport(ModalityState.ok, None, 0.5),
        text=ModalityReport(ModalityState.ok, None, 0.25),
        recovered=None,
        model=("drf-offline", "v1"),
        processed_at="2026-12-03T12:00:00.000Z",
    )
    weights = [0.1 * (i + 1) for i in range(count)]
    document = sentiment_document(post, fusion_weights=weights, **fields)
    assert document["fusion_weights"] == pytest.approx(dict(zip(FUSION_TERMS[:count], weights, strict=True)))
    validator("sentiment").validate(json.loads(json.dumps(document)))
    with pytest.raises(ValueError, match="fusion_weights"):
        sentiment_document(post, fusion_weights=[0.25] * 4, **fields)
