"""The main job on the embedded default, end to end, in one command.

1. Start a local Kafka-protocol broker and Redis unless the configured ones answer.
2. Obtain a model: reuse ``artifacts/demo-model-2.pt`` or train a small one on the VADER demo set
   (real human-rated tweets paired with generated images; offline encoders, frozen; a few minutes once).
3. Produce a stream of test posts with images and texts corrupted or discarded as in the paper
   (modality-random, C+D), plus a few records that are not valid posts.
4. Run the consumer-group service (the same ``Service`` as ``postsense serve``) and show each result
   as it arrives: post, label, quality of each modality, what was recovered.
5. When every record is answered (published or dead-lettered), print the counts, stop the service,
   and stop the local servers this command started.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any

from stream.local_services import LocalServices
from stream.settings import Settings

log = logging.getLogger("stream.commands.demo")

#: Records that are not valid posts, or posts with broken media: the service must dead-letter the first
#: three and answer the rest with modality states, never crash.
ODD_RECORDS: list[tuple[bytes | None, bytes]] = [
    (b"broken-1", b"this is not JSON"),
    (b"broken-2", json.dumps({"text": "a post without an id"}).encode()),
    (b"broken-3", json.dumps({"id": 42, "text": "id of the wrong type"}).encode()),
    (
        b"odd-1",
        json.dumps(
            {"id": "odd-1", "text": "image is base64 garbage", "image": {"base64": "!!not-base64!!"}}
        ).encode(),
    ),
    (
        b"odd-2",
        json.dumps(
            {
                "id": "odd-2",
                "text": "image bytes are not an image",
                "image": {"base64": base64.b64encode(b"GIF89a-truncated").decode()},
            }
        ).encode(),
    ),
    # Nothing usable: abstains.
    (b"odd-3", json.dumps({"id": "odd-3", "text": "   ", "image": None}).encode()),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--posts", type=int, default=120, help="test posts to stream (default 120)")
    parser.add_argument("--dr", type=float, default=0.5, help="share of posts with one modality disrupted")
    parser.add_argument("--rate", type=float, default=20.0, help="posts per second (0: all at once)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="demo data set and feature cache")
    parser.add_argument("--dataset", help="stream the test split of this data set instead (e.g. jsonl:DIR)")
    # The number in the name changes with the default model (2: the robust DRF variant), so a demo model trained
    # with an older default is not reused.
    parser.add_argument("--model-out", type=Path, default=Path("artifacts/demo-model-2.pt"))
    parser.add_argument("--state-dir", type=Path, default=Path(".run/services"))
    parser.add_argument(
        "--keep-services", action="store_true", help="leave the local broker and Redis running"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument(
        "--plain", action="store_true", help="print one line per result instead of a live table"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    services = LocalServices(args.state_dir)
    endpoints = services.ensure_and_report(settings, "demo")
    if endpoints is None:
        return 1
    broker, redis = endpoints
    if not args.plain:  # INFO lines would tear the live table; warnings, errors and progress still show
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        logging.getLogger("postsense.progress").setLevel(logging.INFO)
    try:
        return _demo(args, settings)
    finally:
        if not args.keep_services:
            stopped = [
                name
                for name, ep in (("broker", broker), ("redis", redis))
                if ep.started and services.stop(name)
            ]
            if stopped:
                print(f"stopped {', '.join(stopped)}")


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from connectors.metrics import Metrics
    from core.training import ensure_demo_model
    from stream.components import load_predictor, open_reference_queues
    from stream.feed import dataset_records, send
    from stream.runtime import Service

    checkpoint = settings.model.checkpoint
    if checkpoint is None:
        print("model: training the demo model on first run (reused afterwards) ...")
        checkpoint = ensure_demo_model(args.data_dir, args.model_out)
    predictor = load_predictor(settings, checkpoint)
    print(f"model: {predictor.model_name} {predictor.model_version} on {predictor.device} ({checkpoint})")

    # Fresh topics and group per run: the demo never replays or disturbs an earlier run's stream.
    run_id = uuid.uuid4().hex[:8]
    kafka = settings.kafka.model_copy(
        update={
            "input_topic": f"demo-{run_id}.posts",
            "output_topic": f"demo-{run_id}.sentiment",
            "dead_letter_topic": f"demo-{run_id}.dlq",
            "group_id": f"postsense-demo-{run_id}",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        }
    )
    settings = settings.model_copy(update={"kafka": kafka})
    from connectors.kafka import ensure_topics

    ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic], partitions=3)

    metrics = Metrics()
    results: deque[dict[str, Any]] = deque()
    answered = threading.Semaphore(0)

    def on_output(documents: list[dict[str, Any]]) -> None:
        for doc in documents:
            results.append(doc)
            answered.release()

    queues = open_reference_queues(settings, predictor, metrics)
    service = Service(settings, predictor, metrics=metrics, queues=queues, on_output=on_output)
    worker = threading.Thread(target=service.run, name="serve", daemon=True)
    worker.start()

    spec = args.dataset or f"vader:{args.data_dir}"
    records = list(dataset_records(spec, "test", 0, "C+D", args.dr, None))[: args.posts]
    records += ODD_RECORDS
    producer = threading.Thread(
        target=send, args=(settings, kafka.input_topic, records, args.rate), daemon=True
    )
    producer.start()
    expected_outputs = len(records) - 3  # the three broken records go to the dead-letter topic
    shown = _show(results, answered, expected_outputs, args, service)
    service.stop()
    worker.join(timeout=60)
    if queues is not None:
        queues.close()
    dead = _counter(metrics, "postsense_posts_dead_lettered_total", "reason")
    print()
    print(
        f"posts sent: {len(records)}   sentiment records: {len(shown)}   dead letters: {sum(dead.values())} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(dead.items())) or 'none'})"
    )
    _summary(shown)
    ok = len({d["id"] for d in shown}) == expected_outputs and sum(dead.values()) == 3
    print("every record answered exactly as expected" if ok else "some records were not answered in time")
    return 0 if ok else 1


def _row(doc: dict[str, Any]) -> list[str]:
    mods = doc["modalities"]

    def cell(m: str) -> str:
        q = mods[m]["quality"]
        return f"{q:.2f}" if q is not None else mods[m]["state"]

    truth = (doc.get("metadata") or {}).get("label") or ""
    dis = (doc.get("metadata") or {}).get("disruption")
    how = f"{dis['kind']} {dis['modality']}" if dis else ""
    return [
        doc["id"][:14],
        doc["label"] or "(abstained)",
        truth,
        cell("image"),
        cell("text"),
        doc["recovered"] or "",
        how,
    ]


COLUMNS = ["post", "label", "truth", "image q", "text q", "recovered", "disruption"]


def _show(
    results: deque, answered: threading.Semaphore, expected: int, args: argparse.Namespace, service
) -> list:
    """Show results as they arrive until ``expected`` posts are answered (or the timeout)."""
    shown: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.timeout
    if args.plain:
        while len(shown) < expected and time.monotonic() < deadline and not service.stopping:
            if answered.acquire(timeout=0.5):
                doc = results.popleft()
                shown.append(doc)
                print("  ".join(f"{c:<12}" for c in _row(doc)))
        return shown
    from rich.live import Live
    from rich.table import Table

    def render() -> Table:
        table = Table(title=f"postsense demo: {len(shown)}/{expected} posts answered", expand=False)
        for c in COLUMNS:
            table.add_column(c)
        for doc in shown[-15:]:
            table.add_row(*_row(doc))
        return table

    with Live(render(), refresh_per_second=4) as live:
        while len(shown) < expected and time.monotonic() < deadline and not service.stopping:
            if answered.acquire(timeout=0.25):
                shown.append(results.popleft())
                live.update(render())
    return shown


def _summary(shown: list[dict[str, Any]]) -> None:
    labelled = [d for d in shown if (d.get("metadata") or {}).get("label") and d["label"] is not None]
    correct = sum(d["label"] == d["metadata"]["label"] for d in labelled)
    states = Counter((m, d["modalities"][m]["state"]) for d in shown for m in ("image", "text"))
    recovered = Counter(d["recovered"] for d in shown if d["recovered"])
    abstained = sum(d["abstained"] for d in shown)
    if labelled:
        print(
            f"accuracy on the labelled test posts: {100 * correct / len(labelled):.1f}% ({correct}/{len(labelled)})"
        )
    print("modality states: " + ", ".join(f"{m} {s}: {n}" for (m, s), n in sorted(states.items())))
    print(f"recovered: {dict(recovered) or 'none'}   abstained: {abstained}")


def _counter(metrics, name: str, label: str) -> Counter:
    out: Counter = Counter()
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels[label]] += int(sample.value)
    return out
