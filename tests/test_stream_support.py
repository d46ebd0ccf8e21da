"""Shared helpers (no tests here) for the stream integration tests: settings, posts, reading topics back."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from PIL import Image

from connectors.kafka import committed_offsets, ensure_topics, make_producer
from stream.runtime import Service
from stream.settings import Settings, load_settings

LABELS = ["negative", "neutral", "positive"]


def stream_settings(services: Any, names: Callable[[str], str], partitions: int = 4, **sections: dict) -> Settings:
    """Settings for one test: fresh topics and group, fast group joins (Tansu), small batches."""
    flags: dict[str, dict[str, Any]] = {
        "kafka": {
            "bootstrap_servers": [services.bootstrap],
            "group_id": names("group"),
            "input_topic": names("posts"),
            "output_topic": names("sentiment"),
            "dead_letter_topic": names("dlq"),
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "produce_timeout_s": 10.0,
        },
        "batch": {"max_posts": 8, "max_wait_ms": 100, "decode_workers": 2},
        "redis": {"url": services.redis_url, "key_prefix": names("q")},
        "metrics": {"port": 0},
    }
    for section, fields in sections.items():
        flags.setdefault(section, {}).update(fields)
    settings = load_settings(None, flags)
    k = settings.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=partitions)
    return settings


def png_base64(colour: tuple[int, int, int] = (220, 40, 40), size: tuple[int, int] = (40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def valid_posts(n: int, prefix: str = "p") -> list[dict[str, Any]]:
    """Valid posts cycling through the modality cases: both, text only, image only, corrupt image, blank text."""
    image = png_base64()
    cases = [
        lambda i: {"text": f"a lovely day number {i}", "image": {"base64": image}},
        lambda i: {"text": f"just text {i}"},
        lambda i: {"text": None, "image": {"base64": image}},
        lambda i: {"text": f"broken picture {i}", "image": {"base64": "not base64 at all!"}},
        lambda i: {"text": "   ", "image": {"base64": image}},
    ]
    return [
        {"id": f"{prefix}{i}", "created_at": "2026-11-23T12:00:00Z", **cases[i % len(cases)](i)} for i in range(n)
    ]


def produce(settings: Settings, values: Iterable[bytes], keys: Iterable[bytes | None] | None = None) -> dict[int, int]:
    """Send raw values to the input topic; returns the end offset (last + 1) per partition written."""
    producer = make_producer(settings.kafka, settings.limits)
    values = list(values)
    keys = list(keys) if keys is not None else [None] * len(values)
    futures = [producer.send(settings.kafka.input_topic, key=k, value=v) for k, v in zip(keys, values, strict=True)]
    producer.flush()
    ends: dict[int, int] = {}
    for f in futures:
        meta = f.get(timeout=10)
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    producer.close()
    return ends


def produce_posts(settings: Settings, posts: list[dict[str, Any]]) -> dict[int, int]:
    return produce(settings, [json.dumps(p).encode() for p in posts], [p["id"].encode() for p in posts])


def read_topic(settings: Settings, topic: str, expect: int, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` (no group), waiting until at least ``expect`` arrived or the timeout."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        partitions = None
        deadline = time.monotonic() + timeout_s
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        assert partitions, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
            if len(records) >= expect:
                # Linger briefly: duplicates, if any, must be seen too.
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(batch)
                break
        return records
    finally:
        consumer.close()


def wait_committed(settings: Settings, ends: dict[int, int], timeout_s: float = 20.0) -> dict[int, int]:
    """The group's committed offsets once they reach ``ends`` (or whatever they are at the timeout)."""
    deadline = time.monotonic() + timeout_s
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        committed = committed_offsets(settings.kafka, settings.kafka.input_topic)
        if all(committed.get(p, 0) >= end for p, end in ends.items()):
            break
        time.sleep(0.3)
    return committed


class Running:
    """A Service on a thread: ``with Running(service) as r: ...`` stops it and re-raises its error, if any."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.service.stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "service did not stop"

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Collector:
    """An output hook that records documents and can wait for a number of them."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []
        self.batch_sizes: list[int] = []
        self._cond = threading.Condition()

    def __call__(self, documents: list[dict[str, Any]]) -> None:
        with self._cond:
            self.documents.extend(documents)
            self.batch_sizes.append(len(documents))
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.documents) >= n, timeout_s)
