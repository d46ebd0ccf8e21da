"""Shared helpers (no tests here) for the stream integration tests: settings, posts, reading topics back."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from helpers import wait_until
from images import png_base64
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from connectors.kafka import KafkaSettings, ensure_topics, make_admin, make_producer
from stream.local_services import Endpoints, fresh_stream_settings
from stream.runtime import Service
from stream.settings import Settings

LABELS = ["negative", "neutral", "positive"]


def stream_settings(
    services: Endpoints, names: Callable[[str], str], partitions: int = 4, **sections: dict[str, Any]
) -> Settings:
    """Settings for one test (``fresh_stream_flags``: own topics and group, short group timings), small batches,
    a short publish timeout; its three topics created with ``partitions`` partitions."""
    sections["kafka"] = {"produce_timeout_s": 10.0, **sections.get("kafka", {})}
    sections["batch"] = {"max_posts": 8, "max_wait_ms": 100, "decode_workers": 2, **sections.get("batch", {})}
    settings = fresh_stream_settings(services, names, **sections)
    k = settings.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=partitions)
    return settings


def cli(settings: Settings, *args: str, checkpoint: Path | None = None, metrics_port: int = 0) -> list[str]:
    """The installed ``postsense`` console command with ``settings`` as global flags, then ``args``."""
    k, b = settings.kafka, settings.batch
    flags = [
        "--bootstrap-servers",
        ",".join(k.bootstrap_servers),
        "--group-id",
        k.group_id,
        "--input-topic",
        k.input_topic,
        "--output-topic",
        k.output_topic,
        "--dead-letter-topic",
        k.dead_letter_topic,
        "--redis-url",
        settings.redis.url.get_secret_value(),
        "--metrics-port",
        str(metrics_port),
        "--set",
        f"kafka.session_timeout_ms={k.session_timeout_ms}",
        "--set",
        f"kafka.heartbeat_interval_ms={k.heartbeat_interval_ms}",
        "--set",
        f"batch.max_posts={b.max_posts}",
        "--set",
        f"batch.max_wait_ms={b.max_wait_ms}",
        "--set",
        f"redis.key_prefix={settings.redis.key_prefix}",
    ]
    if checkpoint is not None:
        flags += ["--checkpoint", str(checkpoint)]
    return [str(Path(sys.executable).parent / "postsense"), *flags, *args]


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
        {"id": f"{prefix}{i}", "created_at": "2026-11-23T12:00:00Z", **cases[i % len(cases)](i)}
        for i in range(n)
    ]


def produce(
    settings: Settings, values: Iterable[bytes], keys: Iterable[bytes | None] | None = None
) -> dict[int, int]:
    """Send raw values to the input topic; returns the end offset (last + 1) per partition written."""
    producer = make_producer(settings.kafka, settings.limits)
    values = list(values)
    keys = list(keys) if keys is not None else [None] * len(values)
    futures = [
        producer.send(settings.kafka.input_topic, key=k, value=v) for k, v in zip(keys, values, strict=True)
    ]
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


def committed_offsets(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    """The group's committed next-offset per partition of ``topic`` (partitions never committed are absent)."""
    admin = make_admin(kafka)
    try:
        offsets = admin.list_group_offsets({kafka.group_id: None}).get(kafka.group_id, {})
    finally:
        admin.close()
    return {
        tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0
    }


def wait_committed(settings: Settings, ends: dict[int, int], timeout_s: float = 20.0) -> dict[int, int]:
    """The group's committed offsets once they reach ``ends`` (or whatever they are at the timeout), asking
    again while the broker does not answer (a fault test's broker may still be coming back)."""
    committed: dict[int, int] = {}

    def reached() -> bool:
        nonlocal committed
        try:
            committed = committed_offsets(settings.kafka, settings.kafka.input_topic)
        except KafkaError:
            return False
        return all(committed.get(p, 0) >= end for p, end in ends.items())

    wait_until(reached, timeout_s, interval_s=0.3)
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
        except BaseException as exc:  # every error, KeyboardInterrupt included, is handed to the test
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
