"""Send posts to a topic: from a data set (optionally disrupted as in the paper's section 4.1) or a JSONL file.

For ``postsense produce``, the demo, tests and benchmarks. A data set's labelled samples become input
posts (image as base64, the label and disruption in ``metadata``, ``created_at`` stamped at send time so
the service's end-to-end latency is real); a JSONL file's lines are sent verbatim, invalid ones included
(to exercise the dead-letter path). Every send is checked.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectors.kafka import make_producer
from core.contracts import SCHEMA_VERSION, dumps_strict, utc_now_iso
from stream.settings import Settings

if TYPE_CHECKING:
    from core.data import Sample

log = logging.getLogger(__name__)

#: (key, value): raw bytes sent as they are, or a post document serialised at send time.
Record = tuple[bytes | None, bytes | dict[str, Any]]

#: Unacknowledged sends checked at most this many at a time, so memory stays bounded on big inputs.
CHECK_EVERY = 1000


@dataclass
class ProduceReport:
    sent: int
    failed: int
    seconds: float

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        return f"sent {self.sent} records ({self.failed} failed) in {self.seconds:.1f} s ({rate:.0f}/s)"


def jsonl_records(path: Path) -> Iterator[Record]:
    """(key, value) per non-empty line: the value untouched, the key the post id when the line has one."""
    with open(path, "rb") as fh:
        for line in fh:
            value = line.rstrip(b"\r\n")
            if not value.strip():
                continue
            try:
                post_id = json.loads(value).get("id")
            except (ValueError, AttributeError):
                post_id = None
            yield (post_id.encode() if isinstance(post_id, str) else None), value


def dataset_records(
    spec: str,
    split: str,
    seed: int,
    disrupt: str | None,
    dr: float | None,
    modality: str | None,
) -> Iterator[Record]:
    """Posts built from a data set split, disrupted with the paper's protocol when ``disrupt`` is set."""
    from core.data import load_dataset
    from core.data.disruption import modality_fixed, modality_random

    dataset = load_dataset(spec, seed=seed)
    if split not in dataset.splits:
        raise ValueError(f"data set {spec!r} has no split {split!r} (it has {', '.join(dataset.splits)})")
    samples = list(dataset[split])
    if disrupt:
        if modality is not None:
            samples, _ = modality_fixed(samples, modality, disrupt, seed)  # type: ignore[arg-type]
        elif dr is not None:
            samples, _ = modality_random(samples, dr, disrupt, seed)  # type: ignore[arg-type]
        else:
            raise ValueError("--disrupt needs --dr (modality-random) or --modality (modality-fixed)")
    for sample in samples:
        yield sample.id.encode(), sample_post(sample)


def sample_post(sample: Sample) -> dict[str, Any]:
    """The input-contract post of a labelled sample (the label rides along in metadata)."""
    from core.data import load_image

    image = load_image(sample)  # at model-input size, with a corruption mask applied exactly
    field = None
    if image is not None:
        buf = io.BytesIO()
        # A masked image keeps its exact zero pixels only losslessly; clean ones travel as compact JPEG.
        corrupted = sample.disruption is not None and sample.disruption.modality == "image"
        image.save(buf, "PNG" if corrupted else "JPEG", quality=90)
        field = {"base64": base64.b64encode(buf.getvalue()).decode()}
    d = sample.disruption
    return {
        "schema_version": SCHEMA_VERSION,
        "id": sample.id,
        "text": sample.text,
        "image": field,
        "metadata": {
            "label": sample.label_name,
            "disruption": None
            if d is None
            else {"modality": d.modality, "kind": d.kind, "fraction": d.fraction},
        },
    }


def limited(records: Iterable[Record], limit: int | None) -> Iterator[Record]:
    for count, record in enumerate(records):
        if limit is not None and count >= limit:
            return
        yield record


def _encoded(value: bytes | dict[str, Any]) -> bytes:
    """Raw bytes are sent untouched; a post built here gets created_at = now, so latency is measured from the send."""
    if isinstance(value, bytes):
        return value
    return dumps_strict({**value, "created_at": utc_now_iso()}).encode()


def send(
    settings: Settings,
    topic: str,
    records: Iterable[Record],
    rate: float = 0.0,
) -> ProduceReport:
    """Send (key, value) records at ``rate`` per second (0: unthrottled); every send's result is checked."""
    producer = make_producer(settings.kafka, settings.limits)
    started = time.monotonic()
    sent = failed = 0
    pending: list[Any] = []

    def check() -> int:
        bad = 0
        for future in pending:
            try:
                future.get(timeout=settings.kafka.produce_timeout_s)
            except Exception as exc:  # counted; the first few are logged
                bad += 1
                if failed + bad <= 3:
                    log.error("send failed: %s: %s", type(exc).__name__, exc)
        pending.clear()
        return bad

    try:
        for key, value in records:
            if rate > 0:
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            pending.append(producer.send(topic, key=key, value=_encoded(value)))
            sent += 1
            if len(pending) >= CHECK_EVERY:
                producer.flush()
                failed += check()
        producer.flush()
        failed += check()
    finally:
        producer.close()
    return ProduceReport(sent=sent, failed=failed, seconds=time.monotonic() - started)
