"""Hostile input: every record ends as a scored post (bad modalities as states) or a dead letter with a reason.

Two levels. Property-based: any bytes, any JSON and any image field through the service's own batch path
(validate, decode, predict, build the output records) never raise, and every output is a valid contract
record. End to end: a hand-written corpus (bombs, odd image modes, a 10 MB text, lone surrogates, deep
nesting, a private-address URL...) through ``postsense serve`` against the real broker, counted in and out,
with the worker's peak memory bounded by the configured limits. Image decoding itself is unit-tested in
tests/connectors/test_media.py (both build their images with images.py).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import report_counts, strict_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from images import encode, grey_png, png_base64, solid_png_bomb
from PIL import Image
from stream_support import cli, produce, read_topic, stream_settings

from connectors.metrics import Metrics
from core.contracts import DEAD_LETTER_HEADER, Invalid, validator
from core.inference import Predictor
from stream.processor import OVERSIZED_PREFIX_BYTES, BatchProcessor, Record, validate
from stream.settings import load_settings

# --- property-based, through the batch path (no Kafka) ---------------------------------------------

# Any code point, with the troublesome ones drawn often: lone surrogates (valid JSON escapes, not UTF-8),
# NUL, combining marks, right-to-left overrides, astral emoji. Built as lists, since hypothesis would merge
# a union of character strategies into one and draw the few special ones almost never.
TRICKY = ["\ud800", "\udfff", "\x00", "\u0301", "\u202e", "\U0001f600", "\n"]
ANY_CHAR = st.sampled_from(TRICKY) | st.characters(exclude_categories=())


def texts(min_size: int = 0, max_size: int = 30) -> st.SearchStrategy[str]:
    return st.lists(ANY_CHAR, min_size=min_size, max_size=max_size).map("".join)


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts(max_size=30)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts(max_size=8), inner, max_size=4),
    max_leaves=20,
)


IMAGE_FIELDS = st.one_of(
    st.none(),
    st.builds(lambda s: {"base64": s}, texts(max_size=40)),
    st.builds(lambda b: {"base64": base64.b64encode(b).decode()}, st.binary(max_size=300)),
    st.builds(lambda s: {"url": s}, texts(1, 60)),
    st.builds(lambda s: {"path": s}, texts(1, 40)),
    st.just({"base64": png_base64((10, 200, 30), (8, 8))}),
)
# Schema-valid posts (so the decode and predict path is exercised), hostile in their contents.
POSTS = st.fixed_dictionaries(
    {"id": texts(1, 20)},
    optional={
        "text": st.none() | texts(max_size=200),
        "image": IMAGE_FIELDS,
        "created_at": st.none() | st.just("2026-11-23T12:00:00Z"),
        "metadata": st.none() | st.dictionaries(texts(max_size=8), JSON_VALUES, max_size=4),
        "schema_version": st.just(1),
    },
)
# Anything at all, including posts one field away from valid.
RAW_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda p, k, v: json.dumps({**p, k: v}).encode(),
        POSTS,
        st.sampled_from(["id", "text", "created_at"]),
        JSON_VALUES,
    ),
    POSTS.map(lambda p: json.dumps(p).encode()),
    POSTS.map(lambda p: json.dumps(p).encode()),
    POSTS.map(lambda p: json.dumps(p).encode()[: len(json.dumps(p)) // 2]),  # truncated
)


@pytest.fixture(scope="module")
def processor(predictor: Predictor) -> BatchProcessor:
    # Offline fetch policy: URLs may name only a host that never resolves, so nothing leaves the machine.
    cfg = load_settings(
        None,
        {
            "media": {"allowed_hosts": ["images.invalid"], "fetch_timeout_s": 0.5},
            "limits": {"max_text_chars": 100, "max_metadata_depth": 3},
        },
    )
    return BatchProcessor(cfg, predictor, Metrics())


@given(values=st.lists(RAW_VALUES, min_size=1, max_size=6))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
def test_any_record_is_scored_or_dead_lettered_never_an_exception(
    processor: BatchProcessor, values: list
) -> None:
    records = [Record("posts", 0, i, b"k%d" % i, v) for i, v in enumerate(values)]
    parsed = [(r, validate(r, processor.limits)) for r in records]
    invalid = [(r, p) for r, p in parsed if isinstance(p, Invalid)]
    decoded = [processor.decode(r, p) for r, p in parsed if not isinstance(p, Invalid)]
    result = processor.process(decoded, invalid)

    assert len(result.records) == len(records)  # one output per input, nothing dropped
    check = validator("sentiment")
    for doc, out in zip(result.documents, result.records, strict=False):
        assert not list(check.iter_errors(doc)), doc
        assert out.key == doc["id"].encode() and strict_json(out.value) == doc
    letters = result.records[len(result.documents) :]
    assert [dict(r.headers)["postsense.reason"].decode() for r in letters] == [p.reason for _, p in invalid]
    assert all(r.value == record.value for r, (record, _) in zip(letters, invalid, strict=True))  # untouched


# --- end to end: a hand-written corpus through `postsense serve` ----------------------------------


class Trap(http.server.BaseHTTPRequestHandler):
    """An image server on 127.0.0.1 that must never be asked for anything."""

    hits: list[str] = []

    def do_GET(self) -> None:  # the name http.server dispatches GET requests to
        Trap.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # silence: the test reads Trap.hits instead
        pass


def b64(data: bytes) -> dict[str, str]:
    return {"base64": base64.b64encode(data).decode()}


def jpeg(mode: str = "RGB", **save: Any) -> bytes:
    return encode(
        Image.new(mode, (64, 48), (40, 90, 200) if mode == "RGB" else (10, 20, 30, 40)), "JPEG", **save
    )


def corpus(trap_url: str) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """(key, value) records and the outcome each must have: ("dead", reason) or (image state, reason)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    gif = encode(
        Image.new("RGB", (10, 10), "red"),
        "GIF",
        save_all=True,
        append_images=[Image.new("RGB", (10, 10), "blue")],
    )
    png16 = encode(Image.new("I;16", (32, 32), 40000), "PNG")
    full = jpeg()
    posts: dict[str, tuple[Any, tuple[str, str | None]]] = {
        "bomb": (
            b64(solid_png_bomb(12000)),
            ("undecodable", "too_many_pixels"),
        ),  # 144 Mpx of black in ~150 KB
        "huge-header": (b64(grey_png(30000, 30000, b"\x00" * 64)), ("undecodable", "too_many_pixels")),
        "gif": (b64(gif), ("ok", None)),
        "cmyk": (b64(jpeg("CMYK")), ("ok", None)),
        "16bit": (b64(png16), ("ok", None)),
        "exif": (b64(jpeg(exif=exif)), ("ok", None)),
        "zero-bytes": ({"base64": ""}, ("empty", "empty_value")),
        "truncated": (b64(full[: len(full) // 2]), ("undecodable", None)),  # truncated or decode_error
        "not-image": (b64(b"%PDF-1.4 not an image at all" * 10), ("undecodable", "not_an_image")),
        "b64-garbage": ({"base64": "!!!%%%***"}, ("undecodable", "base64_invalid")),
        "private-url": ({"url": trap_url}, ("undecodable", "fetch_refused_private_address")),
        "too-big-image": (b64(b"\xff\xd8" + b"\x00" * 300_000), ("undecodable", "too_large")),
        "huge-text": (None, ("missing", None)),
    }
    values = []
    for pid, (image, _) in posts.items():
        text = "x " * 5_000_000 if pid == "huge-text" else f"post {pid}"  # 10 MB of text
        values.append((pid, json.dumps({"id": pid, "text": text, "image": image}).encode()))
    expected: dict[str, Any] = {pid: outcome for pid, (_, outcome) in posts.items()}
    nested: Any = "deep"
    for _ in range(50):
        nested = {"k": nested}
    dead = {
        "not-json": (b"{this is not json", "not_json"),
        "bad-utf8": (b'{"id": "u", "text": "\xff\xfe"}', "not_utf8"),
        "lone-surrogate-id": (b'{"id": "\\ud800", "text": "hi"}', "not_utf8"),
        "lone-surrogate-text": (b'{"id": "s", "text": "bad \\udfff"}', "not_utf8"),
        "wrong-types": (json.dumps({"id": 12, "text": ["a"]}).encode(), "schema_invalid"),
        "image-string": (json.dumps({"id": "i", "image": "aGVsbG8="}).encode(), "schema_invalid"),
        "extra-field": (json.dumps({"id": "e", "text": "t", "sql": "drop"}).encode(), "schema_invalid"),
        "deep-metadata": (
            json.dumps({"id": "d", "text": "t", "metadata": nested}).encode(),
            "metadata_too_deep",
        ),
        "deep-json": (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        "oversized": (json.dumps({"id": "o", "text": "y" * 13_000_000}).encode(), "too_large"),
        "array": (b"[1, 2, 3]", "schema_invalid"),
    }
    for key, (value, reason) in dead.items():
        values.append((key, value))
        expected[key] = ("dead", reason)
    values.append(("tombstone", None))  # type: ignore[arg-type]
    expected["tombstone"] = ("dead", "empty_value")
    return values, expected


@pytest.mark.services
@pytest.mark.slow
def test_hostile_corpus_through_serve_every_record_accounted_for_memory_bounded(
    services, names, tiny_checkpoint, tmp_path
):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trap)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings_ = stream_settings(
        services,
        names,
        partitions=2,
        batch={"max_posts": 8, "max_wait_ms": 50},
        limits={
            "max_record_bytes": 12 * 1024 * 1024,
            "max_image_pixels": 4_000_000,
            "max_image_bytes": 256 * 1024,
        },
    )
    values, expected = corpus(f"http://127.0.0.1:{server.server_address[1]}/cat.jpg")
    # The feeder may send more than the worker accepts (the "oversized" record is past its limit).
    feeder = settings_.model_copy(
        update={"limits": settings_.limits.model_copy(update={"max_record_bytes": 32 << 20})}
    )
    produce(feeder, [v for _, v in values], [k.encode() for k, _ in values])
    limits = settings_.limits
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "POSTSENSE_LIMITS__MAX_RECORD_BYTES": str(limits.max_record_bytes),
        "POSTSENSE_LIMITS__MAX_IMAGE_PIXELS": str(limits.max_image_pixels),
        "POSTSENSE_LIMITS__MAX_IMAGE_BYTES": str(limits.max_image_bytes),
        "POSTSENSE_REDIS__KEY_PREFIX": settings_.redis.key_prefix,
    }
    proc = subprocess.Popen(
        cli(settings_, "serve", "--no-reference-queues", checkpoint=tiny_checkpoint),
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        posts = [k for k, _ in values if expected[k][0] != "dead"]
        dead = [k for k, _ in values if expected[k][0] == "dead"]
        out = read_topic(settings_, settings_.kafka.output_topic, expect=len(posts), timeout_s=120)
        dlq = read_topic(settings_, settings_.kafka.dead_letter_topic, expect=len(dead), timeout_s=30)
        assert proc.poll() is None, "the worker died"
        peak_kib = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM")
            )
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.shutdown()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert "Traceback" not in stderr.decode(errors="replace")
    report_counts("hostile corpus", posts + dead, [r.key.decode() for r in out + dlq], dead_lettered=len(dlq))

    docs = {r.key.decode(): json.loads(r.value) for r in out}
    assert sorted(docs) == sorted(posts)
    for pid in posts:
        state, reason = expected[pid]
        image = docs[pid]["modalities"]["image"]
        assert image["state"] == state, (pid, image)
        if reason is not None:
            assert image["reason"] == reason, (pid, image)
        assert docs[pid]["modalities"]["text"]["state"] == "ok"  # scored on its text whatever the image did
        assert not list(validator("sentiment").iter_errors(docs[pid]))
    assert docs["truncated"]["modalities"]["image"]["reason"] in ("truncated", "decode_error")
    letters = {r.key.decode(): r for r in dlq}
    assert sorted(letters) == sorted(dead)
    original = dict(values)
    for key in dead:
        assert dict(letters[key].headers)["postsense.reason"].decode() == expected[key][1], key
        if (
            key == "oversized"
        ):  # past the record limit only a prefix is kept (it could never be produced whole)
            assert letters[key].value == original[key][:OVERSIZED_PREFIX_BYTES]
        else:
            assert letters[key].value == original[key]  # the original bytes, untouched
        assert not list(
            validator("dead_letter").iter_errors(json.loads(dict(letters[key].headers)[DEAD_LETTER_HEADER]))
        )
    assert Trap.hits == [], "the worker fetched from a private address"
    # The 144 Mpx bomb decoded would take ~430 MB as RGB, the 30,000^2 header 2.7 GB: the limits kept the worker small.
    print(f"\n[memory] hostile corpus: worker peak RSS {peak_kib / 1024:.0f} MiB")
    assert peak_kib < 1_024 * 1024  # ~670 MiB measured here: torch, the tiny model and a 13 MB record
