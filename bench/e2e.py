"""End-to-end throughput and latency of the serve loop: Kafka in → decode → DRF → Kafka out → commit.

Usage: OMP_NUM_THREADS=2 .venv/bin/python -m bench.e2e [--config offline|tiny] [--batch-sizes 8 32]
       [--posts 400] [--latency-seconds 30] [--rate-fraction 0.5] [--smoke]

Per batch size, two runs of the in-process ``Service`` against a real broker (Tansu) and Redis
(reference queues online), each with fresh topics and group:

* throughput: a backlog of ``--posts`` posts (bench.common's mix: ~50 KB photos, real tweets, missing
  and corrupt media, a few invalid records) is consumed; posts/s is measured from the first published
  batch to the last, so the group join and model warm-up are not counted.
* latency: posts are produced at ``--rate-fraction`` of that throughput for ``--latency-seconds``;
  latency is ``created_at`` (stamped at send) → the batch's records acknowledged by the broker.
* bare forward, paired: right after each throughput run, the model's forward alone on the *same* posts, decoded
  and tokenised beforehand as the service does it (untimed), in batches of the same size. End to end against
  this is the like-for-like ratio: the same work, but for the JPEG bytes, Kafka and publishing, measured minutes
  apart in one process (the 2-core machine drifts by more than the gap between runs of a separate benchmark).
  ``--rounds R`` repeats throughput + bare forward R times per batch size, alternating; medians are reported.

Prints a table and writes bench/results/e2e.json (machine, command, versions, settings).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Endpoints,
    base_parser,
    bench_predictor,
    bench_settings,
    local_services,
    make_posts,
    percentile,
    print_table,
    rss_bytes,
    service_options,
    stamp_created_at,
    write_result,
)
from connectors.kafka import ensure_topics, make_producer  # noqa: E402
from connectors.metrics import Metrics, parse_created_at  # noqa: E402
from core.contracts import Invalid  # noqa: E402
from stream.processor import BatchProcessor, Record, validate  # noqa: E402
from stream.runtime import Service  # noqa: E402
from stream.settings import Settings  # noqa: E402

PARTITIONS = 6


class Outputs:
    """The output hook: when each published batch arrived and each post's created_at → published latency."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.batches: list[tuple[float, int]] = []  # (monotonic time, posts)
        self.latencies: list[float] = []
        self.count = 0

    def __call__(self, documents: list[dict[str, Any]]) -> None:
        now_wall, now = time.time(), time.monotonic()
        with self.lock:
            self.batches.append((now, len(documents)))
            for doc in documents:
                created = parse_created_at(doc["event_time"])
                if created is not None:
                    self.latencies.append(now_wall - created)
            self.count += len(documents)
            self.lock.notify_all()

    def wait_for(self, n: int, timeout_s: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.count >= n, timeout_s)


def send(settings: Settings, records: list[bytes], rate: float = 0.0) -> None:
    """Produce ``records`` (created_at stamped at send time) at ``rate`` per second (0: as fast as possible)."""
    producer = make_producer(settings.kafka, settings.limits)
    started = time.monotonic()
    futures = []
    for i, record in enumerate(records):
        if rate > 0:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        futures.append(producer.send(settings.kafka.input_topic, value=stamp_created_at(record)))
    producer.flush()
    for f in futures:
        f.get(timeout=30)
    producer.close()


def run_settings(endpoints: Endpoints, max_posts: int, workers: int) -> Settings:
    settings = bench_settings(endpoints, max_posts)
    settings.batch.decode_workers = workers
    settings.batch.max_wait_ms = 50
    return settings


def valid_count(records: list[bytes]) -> int:
    return sum(1 for r in records if not r.startswith(b'{"id": "broken"'))


def start(settings: Settings, predictor: Any, outputs: Outputs) -> tuple[Service, threading.Thread]:
    k = settings.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=PARTITIONS)
    from connectors.reference_queues import ReferenceQueues, checkpoint_reference

    metrics = Metrics()
    queues = ReferenceQueues(settings.redis, predictor.model_version, metrics)
    contents, capacity = checkpoint_reference(predictor)
    queues.seed(contents, capacity=capacity)
    service = Service(settings, predictor, metrics=metrics, queues=queues, on_output=outputs)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not service.ready() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not service.ready():
        raise RuntimeError("the service got no partitions within 60 s")
    return service, thread


def throughput_run(
    endpoints: Endpoints, predictor: Any, batch: int, posts: int, workers: int
) -> dict[str, Any]:
    settings = run_settings(endpoints, batch, workers)
    records = make_posts(posts, seed=1)
    expected = valid_count(records)
    ensure_topics(settings.kafka, [settings.kafka.input_topic], partitions=PARTITIONS)
    send(settings, records)  # the backlog is in place before the service starts
    outputs = Outputs()
    service, thread = start(settings, predictor, outputs)
    try:
        complete = outputs.wait_for(expected, timeout_s=max(120.0, posts * 0.5))
    finally:
        service.stop()
        thread.join(60)
    first_time, first_n = outputs.batches[0]
    last_time = outputs.batches[-1][0]
    steady = outputs.count - first_n
    return {
        "batch": batch,
        "posts": expected,
        "published": outputs.count,
        "complete": complete,
        "posts_per_s": steady / (last_time - first_time) if last_time > first_time else 0.0,
    }


def bare_forward_run(settings: Settings, predictor: Any, records: list[bytes], batch: int) -> dict[str, Any]:
    """The model's forward alone (``model(batch)``, as bench.forward times it) on the valid posts of ``records``,
    decoded and prepared beforehand exactly as the service's processor does (decode pool and tokeniser untimed),
    in batches of ``batch`` posts; one untimed batch first."""
    import torch

    processor = BatchProcessor(settings, predictor, Metrics())
    decoded = []
    for offset, value in enumerate(records):
        record = Record(settings.kafka.input_topic, 0, offset, None, stamp_created_at(value))
        post = validate(record, processor.limits)
        if not isinstance(post, Invalid):
            decoded.append(processor.decode(record, post))
    batches = [
        predictor.prepare([p.pixels for p in chunk], [p.text for p in chunk]).to(predictor.device)
        for chunk in (decoded[i : i + batch] for i in range(0, len(decoded), batch))
    ]
    with torch.inference_mode():
        predictor.model(batches[0])
        started = time.perf_counter()
        for prepared in batches:
            predictor.model(prepared)
        seconds = time.perf_counter() - started
    return {"batch": batch, "posts": len(decoded), "posts_per_s": len(decoded) / seconds}


def latency_run(
    endpoints: Endpoints, predictor: Any, batch: int, rate: float, seconds: float, workers: int
) -> dict[str, Any]:
    settings = run_settings(endpoints, batch, workers)
    records = make_posts(max(1, int(rate * seconds)), seed=2)
    expected = valid_count(records)
    outputs = Outputs()
    service, thread = start(settings, predictor, outputs)
    try:
        send(settings, records, rate=rate)
        complete = outputs.wait_for(expected, timeout_s=seconds + 120)
    finally:
        service.stop()
        thread.join(60)
    lat = sorted(outputs.latencies)
    return {
        "batch": batch,
        "rate_posts_per_s": rate,
        "posts": expected,
        "published": outputs.count,
        "complete": complete,
        "latency_p50_s": percentile(lat, 50) if lat else None,
        "latency_p99_s": percentile(lat, 99) if lat else None,
        "latency_max_s": lat[-1] if lat else None,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    service_options(parser)
    parser.add_argument(
        "--config", choices=["offline", "paper", "tiny"], default=None, help="encoders (default offline)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--posts", type=int, default=None, help="backlog size of the throughput run")
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument(
        "--rate-fraction", type=float, default=0.5, help="latency run rate, share of throughput"
    )
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="throughput + bare forward rounds per batch size (medians)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    config = args.config or ("tiny" if args.smoke else "offline")
    batch_sizes = args.batch_sizes or ([8] if args.smoke else [8, 32])
    posts = args.posts or (40 if args.smoke else 400)
    seconds = args.latency_seconds or (3.0 if args.smoke else 30.0)

    predictor = bench_predictor(config)
    rows = []
    with local_services(args) as endpoints:
        for batch in batch_sizes:
            rounds = []
            for _ in range(args.rounds):
                tp = throughput_run(endpoints, predictor, batch, posts, args.decode_workers)
                bare = bare_forward_run(
                    run_settings(endpoints, batch, args.decode_workers),
                    predictor,
                    make_posts(posts, seed=1),
                    batch,
                )
                rounds.append((tp, bare))
                print(
                    f"batch {batch}: {tp['posts_per_s']:.1f} posts/s, bare {bare['posts_per_s']:.1f}",
                    flush=True,
                )
            tp = {**median_round([t for t, _ in rounds]), "rounds": [t for t, _ in rounds]}
            tp["rss_mib"], tp["peak_rss_mib"] = (b / 2**20 for b in rss_bytes())  # real photos served
            bare = {**median_round([b for _, b in rounds]), "rounds": [b for _, b in rounds]}
            rate = max(1.0, tp["posts_per_s"] * args.rate_fraction)
            lat = latency_run(endpoints, predictor, batch, rate, seconds, args.decode_workers)
            rows.append({"throughput": tp, "bare_forward": bare, "latency": lat})
            print(
                f"batch {batch}: {tp['posts_per_s']:.1f} posts/s (bare forward {bare['posts_per_s']:.1f}); "
                f"at {rate:.1f}/s p50 {lat['latency_p50_s']}, p99 {lat['latency_p99_s']}",
                flush=True,
            )
    print_table(
        f"serve end to end ({config} encoders, {PARTITIONS} partitions, decode workers {args.decode_workers})",
        [
            "batch",
            "posts/s (backlog)",
            "bare forward /s",
            "ratio",
            "backlog done",
            "paced rate /s",
            "p50 ms",
            "p99 ms",
            "paced done",
        ],
        [
            [
                r["throughput"]["batch"],
                r["throughput"]["posts_per_s"],
                r["bare_forward"]["posts_per_s"],
                r["throughput"]["posts_per_s"] / r["bare_forward"]["posts_per_s"],
                r["throughput"]["complete"],
                r["latency"]["rate_posts_per_s"],
                _ms(r["latency"]["latency_p50_s"]),
                _ms(r["latency"]["latency_p99_s"]),
                r["latency"]["complete"],
            ]
            for r in rows
        ],
    )
    path = write_result(
        "e2e",
        {
            "config": config,
            "partitions": PARTITIONS,
            "decode_workers": args.decode_workers,
            "rate_fraction": args.rate_fraction,
            "rounds": args.rounds,
            "rows": rows,
        },
        smoke=args.smoke,
        out_dir=args.out,
    )
    print(f"\nwrote {path}")


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median posts/s (the lower middle one of an even count): a real run, not an average."""
    return dict(sorted(runs, key=lambda run: run["posts_per_s"])[(len(runs) - 1) // 2])


def _ms(seconds: float | None) -> float | str:
    return "-" if seconds is None else seconds * 1000


if __name__ == "__main__":
    main()
