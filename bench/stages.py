"""Item 4: where a batch's time goes, stage by stage, on the service's own code path.

Each batch is polled from the real broker, validated, decoded, scored, proposed to the reference queues,
published and committed by the same calls ``serve`` makes (``validate``, ``BatchProcessor.decode`` and
``.process``, ``Publisher.publish``, ``consumer.commit``), one stage after another on one thread, with
timers around them: forward hooks on the encoder and head modules, and wrappers on the predictor's and
queues' methods. So the stages add up to the batch's single-threaded cost (``serve`` overlaps decoding
with inference in threads, so its wall time per batch is lower). JSON parsing, base64 and image decoding
happen inside ``validate`` and ``decode``; they are also timed on their own (marked "(part)").

    python -m bench.stages [--config offline|tiny] [--batch 32] [--batches 10] [--smoke]
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import (
    Endpoints,
    base_parser,
    bench_predictor,
    bench_settings,
    local_services,
    make_posts,
    print_table,
    service_options,
    spread,
    stamp_created_at,
    synchronize,
    write_result,
)
from bench.queues import count_round_trips

#: (key, label, part): ``part`` stages are also inside another stage and are left out of the total.
STAGES = (
    ("poll", "poll (consumer.poll)", False),
    ("json", "JSON parse", True),
    ("validate", "validate (JSON + schema + limits)", False),
    ("base64", "base64 decode", True),
    ("image_decode", "image decode (Pillow, draft mode)", True),
    ("resize", "resize + crop + normalise", True),
    ("decode", "decode post (base64 + image + resize + text)", False),
    ("tokenise", "stack + tokenise (prepare)", False),
    ("image_encoder", "image encoder", False),
    ("text_encoder", "text encoder", False),
    ("head", "DRF head (projections + eqs. 3-16)", False),
    ("h2d", "host-to-device copy (PreparedBatch.to)", False),
    ("predict_rest", "predict: masks, rule (13), to numpy", False),
    ("redis", "Redis (propose, one EVALSHA)", False),
    ("outputs", "output documents + JSON", False),
    ("produce", "produce (send + flush + acks)", False),
    ("commit", "commit", False),
)


SEED_ROWS, QUEUE_CAPACITY = 64, 512


class Timers:
    """Seconds per stage for the current batch; ``reset`` starts the next batch."""

    def __init__(self) -> None:
        self.batch: dict[str, float] = defaultdict(float)

    def add(self, stage: str, seconds: float) -> None:
        self.batch[stage] += seconds

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        started = clock()
        try:
            yield
        finally:
            self.add(stage, clock() - started)

    def wrap(self, obj: Any, method: str, stage: str) -> Callable[[], None]:
        """Time every call of ``obj.method`` (an instance attribute shadows the class's); returns the undo."""
        original = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.time(stage):
                return original(*args, **kwargs)

        setattr(obj, method, timed)
        return lambda: delattr(obj, method)

    def hook(self, module: Any, stage: str) -> None:
        """Time a torch module's forward calls (on a GPU each clock read waits for the queued work)."""
        started: list[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(clock()))
        module.register_forward_hook(lambda *_: self.add(stage, clock() - started.pop()))


def clock() -> float:
    """``time.perf_counter`` after the GPU's queued work (stages then do not overlap: what each one costs)."""
    synchronize()
    return time.perf_counter()


def run_stages(endpoints: Endpoints, config: str, batch: int, batches: int, seed: int = 0) -> dict[str, Any]:
    from kafka import KafkaConsumer
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from connectors.kafka import consumer_config, ensure_topics
    from connectors.media import decode_image_bytes
    from connectors.metrics import Metrics
    from connectors.reference_queues import ReferenceQueues
    from core.contracts import Invalid, Post
    from stream.feed import send
    from stream.processor import BatchProcessor, Record, validate
    from stream.publisher import Publisher

    # No background refresh during the run, so every Redis round trip counted is the batch's own.
    settings = bench_settings(endpoints, batch=batch, redis={"refresh_interval_s": 3600})
    k = settings.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=1)
    posts = make_posts(batch * (batches + 1), seed)
    report = send(settings, k.input_topic, [(None, stamp_created_at(p)) for p in posts])
    if report.failed:
        raise RuntimeError(f"could not fill the input topic: {report.line()}")

    predictor = bench_predictor(config)
    metrics = Metrics()
    queues = ReferenceQueues(settings.redis, predictor.model_version, metrics)
    processor = BatchProcessor(settings, predictor, metrics, queues)
    publisher = Publisher(k, settings.limits, metrics)
    consumer = KafkaConsumer(**consumer_config(k, batch))
    consumer.subscribe([k.input_topic])
    timers = Timers()
    model = predictor.model
    timers.hook(model.image_encoder, "image_encoder")
    timers.hook(model.text_encoder, "text_encoder")
    for module in (model.image_projection, model.text_projection, model.head):
        timers.hook(module, "head")
    prepare = predictor.prepare

    def prepare_with_timed_copy(*args: Any, **kwargs: Any) -> Any:
        batch = prepare(*args, **kwargs)
        timers.wrap(batch, "to", "h2d")
        return batch

    # A timing wrapper, removed with the "tokenise" wrapper below, which wraps it.
    predictor.prepare = prepare_with_timed_copy  # type: ignore[method-assign]  # instance patch, undone below
    undo = [
        timers.wrap(predictor, "prepare", "tokenise"),
        timers.wrap(predictor, "predict", "predict_total"),
        timers.wrap(queues, "propose", "redis"),
        timers.wrap(processor, "process", "process_total"),
    ]
    rows: list[dict[str, float]] = []
    round_trips: list[int] = []
    stopping = threading.Event()
    try:
        for index in range(batches + 1):  # batch 0 warms up (group join, first forward passes, seeding)
            timers.batch = defaultdict(float)
            records: list[Record] = []
            while len(records) < batch:
                with timers.time("poll"):
                    polled = consumer.poll(timeout_ms=1000, max_records=batch - len(records))
                records += [
                    Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                    for msgs in polled.values()
                    for m in msgs
                ]
            valid: list[tuple[Record, Post]] = []
            invalid: list[tuple[Record, Invalid]] = []
            for record in records:
                with timers.time("json"):
                    try:
                        json.loads(record.value or b"")
                    except ValueError:
                        pass
                with timers.time("validate"):
                    parsed = validate(record, processor.limits)
                if isinstance(parsed, Invalid):
                    invalid.append((record, parsed))
                else:
                    valid.append((record, parsed))
            for _, post in valid:
                if post.image and "base64" in post.image:
                    with timers.time("base64"):
                        raw = base64.b64decode(post.image["base64"])
                    with timers.time("image_decode"):
                        decode_image_bytes(raw, processor.media_limits)
            undo_resize = timers.wrap(predictor, "preprocess_image", "resize")
            with timers.time("decode"):
                decoded = [processor.decode(record, post) for record, post in valid]
            undo_resize()
            if index == 0:
                _seed_queues(queues, predictor, decoded)
            with count_round_trips() as sent:
                result = processor.process(decoded, invalid)
            round_trips.append(sent[0])
            with timers.time("produce"):
                publisher.publish(result.records, stopping)
            offsets = {
                TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.offset + 1, "", -1) for r in records
            }
            with timers.time("commit"):
                consumer.commit(offsets)
            t = timers.batch
            t["predict_rest"] = (
                t["predict_total"] - t["h2d"] - t["image_encoder"] - t["text_encoder"] - t["head"]
            )
            t["outputs"] = t["process_total"] - t["tokenise"] - t["predict_total"] - t["redis"]
            if index > 0:
                rows.append(dict(t))
    finally:
        for restore in undo:
            restore()
        consumer.close()
        publisher.close()
        queues.close()
    return summarise(config, batch, rows, round_trips[1:])


def _seed_queues(queues: Any, predictor: Any, decoded: list[Any]) -> None:
    """Seed the shared queues with this model's own features (an untrained head's checkpoint queues are empty)."""
    import numpy as np

    prediction = predictor.predict(predictor.prepare([d.pixels for d in decoded], [d.text for d in decoded]))
    rng = np.random.default_rng(0)
    seeds = {}
    for name, features, quality in (
        ("image", prediction.image_features, prediction.quality_image),
        ("text", prediction.text_features, prediction.quality_text),
    ):
        rows = features[~np.isnan(quality)]  # the present ones
        picked = rows[rng.integers(0, len(rows), SEED_ROWS)]
        seeds[name] = (picked + rng.normal(0, 0.01, picked.shape)).astype(np.float32)
    queues.seed(seeds, overwrite=True, capacity=QUEUE_CAPACITY)


def summarise(
    config: str, batch: int, rows: list[dict[str, float]], round_trips: list[int]
) -> dict[str, Any]:
    total = [sum(r.get(key, 0.0) for key, _, part in STAGES if not part) for r in rows]
    stages = []
    total_median = spread(total).median
    for key, label, part in STAGES:
        s = spread([r.get(key, 0.0) * 1000 for r in rows])
        stages.append(
            {
                "stage": key,
                "label": label,
                "part_of_another": part,
                "ms_per_batch": s,
                "us_per_post": s.median * 1000 / batch,
                "share": s.median / 1000 / total_median if total_median else 0.0,
            }
        )
    encoders = spread([(r["image_encoder"] + r["text_encoder"]) * 1000 for r in rows]).median
    head = spread([r["head"] * 1000 for r in rows]).median
    return {
        "config": config,
        "batch": batch,
        "batches": len(rows),
        "stages": stages,
        "total_ms_per_batch": spread([t * 1000 for t in total]),
        "single_thread_posts_per_s": batch / total_median if total_median else 0.0,
        "head_over_encoders": head / encoders if encoders else 0.0,
        "redis_round_trips_per_batch": spread([float(n) for n in round_trips]),
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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="measured batches (after one warm-up batch)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.batches < 1:
        parser.error("--batch and --batches must be positive")
    configs = args.config or (["tiny"] if args.smoke else ["offline", "tiny"])
    batch, batches = (4, 2) if args.smoke else (args.batch, args.batches)
    runs = []
    with local_services(args) as endpoints:
        for config in configs:
            run = run_stages(endpoints, config, batch, batches)
            runs.append(run)
            print_table(
                f"Stages, {config} encoders, batch {batch} ({run['batches']} batches; one thread, no overlap)",
                ["stage", "ms/batch", "p25-p75", "µs/post", "share"],
                [
                    [
                        s["label"] + (" (part)" if s["part_of_another"] else ""),
                        s["ms_per_batch"].median,
                        f"{s['ms_per_batch'].p25:.3g}-{s['ms_per_batch'].p75:.3g}",
                        s["us_per_post"],
                        f"{100 * s['share']:.1f} %",
                    ]
                    for s in run["stages"]
                ],
            )
            print(
                f"total {run['total_ms_per_batch'].median:.1f} ms/batch = {run['single_thread_posts_per_s']:.1f} "
                f"posts/s single-threaded; DRF head / encoders = {100 * run['head_over_encoders']:.2f} %; "
                f"Redis round trips per batch: {run['redis_round_trips_per_batch'].median:g} "
                f"(max {run['redis_round_trips_per_batch'].max:g})"
            )
    path = write_result("stages", {"runs": runs}, smoke=args.smoke, out_dir=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
