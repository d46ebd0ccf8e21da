"""Item 3: the naive loop a user would write first, as the reference ``serve`` must beat by 10x.

One post at a time: poll one record, validate, decode, infer (a batch of one), produce and wait for the
acknowledgement, commit, repeat. It reuses the service's own per-post code (``BatchProcessor``) with the
same model and the same posts as bench/e2e.py, so the difference measured is only the architecture:
micro-batching, decode threads overlapping inference, asynchronous produce, one commit per batch.

Latency here is the service time per post (poll to commit), not created_at to publish: the input topic
is filled before the loop starts, so queueing time would only measure how far behind the loop falls.

    python -m bench.naive [--config offline|tiny] [--posts N] [--smoke]
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    Endpoints,
    base_parser,
    bench_predictor,
    bench_settings,
    local_services,
    make_posts,
    percentile,
    print_table,
    service_options,
    stamp_created_at,
    write_result,
)

WARMUP_POSTS = 5  # the group join and the first forward passes (lazy allocations) are not steady state


def run_naive(endpoints: Endpoints, config: str, posts: int, seed: int = 0) -> dict[str, Any]:
    """Fill a fresh topic with ``posts`` posts, then drain it one post at a time; returns throughput and latency."""
    if posts <= WARMUP_POSTS + 1:
        raise ValueError(f"posts must exceed the {WARMUP_POSTS} warm-up posts, got {posts}")
    from kafka import KafkaConsumer, KafkaProducer

    from connectors.kafka import consumer_config, ensure_topics, producer_config
    from connectors.metrics import Metrics
    from core.contracts import Invalid
    from stream.feed import send
    from stream.processor import BatchProcessor, Record, validate

    settings = bench_settings(endpoints, batch=1)
    k = settings.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=6)
    report = send(settings, k.input_topic, [(None, stamp_created_at(r)) for r in make_posts(posts, seed)])
    if report.failed:
        raise RuntimeError(f"could not fill the input topic: {report.line()}")

    # The fp32 model, as a user would write the loop: int8 is part of what serve adds.
    processor = BatchProcessor(settings, bench_predictor(config, precision="fp32"), Metrics())
    consumer = KafkaConsumer(**consumer_config(k, max_posts=1))
    consumer.subscribe([k.input_topic])
    producer = KafkaProducer(
        **{**producer_config(k, settings.limits), "linger_ms": 0}
    )  # the client's default
    service_times: list[float] = []
    done = 0
    started = 0.0
    try:
        while done < posts:
            polled = consumer.poll(timeout_ms=1000, max_records=1)
            for messages in polled.values():
                for m in messages:
                    began = time.perf_counter()
                    record = Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                    parsed = validate(record, processor.limits)
                    if isinstance(parsed, Invalid):
                        result = processor.process([], [(record, parsed)])
                    else:
                        result = processor.process([processor.decode(record, parsed)], [])
                    for out in result.records:
                        producer.send(out.topic, key=out.key, value=out.value, headers=out.headers).get(
                            timeout=k.produce_timeout_s
                        )
                    consumer.commit()
                    done += 1
                    if done == WARMUP_POSTS:
                        started = time.perf_counter()
                    elif done > WARMUP_POSTS:
                        service_times.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - started
    finally:
        consumer.close()
        producer.close()
    measured = len(service_times)
    return {
        "config": config,
        "posts": posts,
        "measured_posts": measured,
        "posts_per_s": measured / elapsed if elapsed > 0 else 0.0,
        "latency_p50_ms": percentile(service_times, 50) * 1000,
        "latency_p99_ms": percentile(service_times, 99) * 1000,
        "service_times_ms": [round(t * 1000, 3) for t in service_times],
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    service_options(parser)
    parser.add_argument(
        "--config",
        action="append",
        choices=["offline", "paper", "tiny"],
        help="repeatable; default offline and tiny",
    )
    parser.add_argument("--posts", type=int, help="posts per configuration (default 300 offline / 1000 tiny)")
    args = parser.parse_args(argv)
    configs = args.config or (["tiny"] if args.smoke else ["offline", "tiny"])
    rows = []
    with local_services(args) as endpoints:
        for config in configs:
            posts = args.posts or (20 if args.smoke else {"offline": 300, "tiny": 1000}[config])
            rows.append(run_naive(endpoints, config, posts))
    print_table(
        "Naive loop: one post at a time, produce().get(), commit per post",
        ["config", "posts", "posts/s", "p50 ms", "p99 ms"],
        [
            [r["config"], r["measured_posts"], r["posts_per_s"], r["latency_p50_ms"], r["latency_p99_ms"]]
            for r in rows
        ],
    )
    path = write_result("naive", {"runs": rows}, smoke=args.smoke, out_dir=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
