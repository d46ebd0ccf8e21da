"""What the shared reference queues cost per batch, against the batch's inference time.

Per batch the hot path makes one ``propose()``: one EVALSHA that appends the accepted features, trims the
queue to L, bumps its version and counts the cap, for both modalities at once.  Measured here with every
feature accepted (the worst case), on a queue kept full at L = 512 (steady state, so every append evicts):

* ``propose ms``: wall time of ``propose()`` in the worker (serialisation + round trip + script);
* ``round trips``: requests the worker wrote to Redis per batch (counted at the socket);
* ``script µs``: time Redis spent inside the script per call (commandstats usec_per_call), i.e. what
  every other worker waits behind while the script holds Redis;
* ``infer ms``: ``Predictor.predict`` of the same batch (tiny and offline encoders, CPU);
* ``refresh ms``: one recomputation of the statistics from the contents (read L x d, queue_statistics,
  compare-and-set), made once per refresh interval per worker, not per batch.

    python -m bench.queues [--config tiny|offline|none] [--batch-sizes 8 32 64] [--repeats N] [--smoke]
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.common import base_parser, bench_predictor, print_table, spread, time_repeats, write_result
from connectors.reference_queues import RedisSettings, ReferenceQueues
from core.contracts import MODALITIES

QUEUE_SIZE = 512
TEXTS = (
    "Just got back from the beach and honestly this was the best weekend I have had in months!",
    "Train delayed again for the third time this week, I am so done with this commute.",
    "Not sure how I feel about the new update, some things are better but the battery drains fast.",
    "Look at these flowers in the park this morning, spring is finally here #happy",
)


@contextlib.contextmanager
def count_round_trips() -> Iterator[list[int]]:
    """Counts requests written to any Redis socket (a pipeline or a script call is one) while open."""
    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def command_counts(client: redis.Redis) -> dict[str, dict[str, float]]:
    return {name.removeprefix("cmdstat_"): stats for name, stats in client.info("commandstats").items()}


def measure_queue(url: str, dim: int, batch: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """propose() cost for one (d, batch) on a full queue of QUEUE_SIZE, and the cost of a stats refresh."""
    rng = np.random.default_rng(seed)
    settings = RedisSettings(
        url=url,
        key_prefix=f"bench-queues-{dim}-{batch}",
        max_accepted_per_interval=10**12,  # measure the append itself, not the guard rail
        refresh_interval_s=3600,  # no background refresh during the timing
    )
    admin = redis.Redis.from_url(url)
    with ReferenceQueues(settings, "bench") as queues:
        queues.seed(
            {m: rng.normal(size=(QUEUE_SIZE, dim)).astype(np.float32) for m in MODALITIES},
            overwrite=True,
            capacity=QUEUE_SIZE,
        )
        batches: list[dict[str, np.ndarray]] = [
            {m: rng.normal(size=(batch, dim)).astype(np.float32) for m in MODALITIES}
            for _ in range(repeats + 1)
        ]
        accepted: dict[str, np.ndarray] = {m: np.ones(batch, dtype=bool) for m in MODALITIES}
        queues.propose(batches.pop(), accepted)  # warm-up: loads the script into Redis (NOSCRIPT once)
        feed = iter(batches)
        admin.config_resetstat()
        with count_round_trips() as sent:
            propose = time_repeats(lambda: queues.propose(next(feed), accepted), repeats, warmup=0)
        counts = command_counts(admin)
        inside = sum(s["calls"] for name, s in counts.items() if name not in ("config|resetstat", "evalsha"))
        assert queues.dropped_updates == 0 and queues.capped_updates == 0, "a proposal was not taken"
        refresh = time_repeats(lambda: _stale_refresh(queues, rng, dim), max(3, repeats // 4), warmup=0)
    return {
        "dim": dim,
        "batch_size": batch,
        "queue_size": QUEUE_SIZE,
        "propose_ms": spread([t * 1e3 for t in propose]),
        "round_trips_per_batch": sent[0] / repeats,
        "evalsha_per_batch": counts.get("evalsha", {}).get("calls", 0) / repeats,
        "commands_inside_script_per_batch": inside / repeats,
        "script_us_per_call": counts.get("evalsha", {}).get("usec_per_call", float("nan")),
        "refresh_ms": spread([t * 1e3 for t in refresh]),
    }


def _stale_refresh(queues: ReferenceQueues, rng: np.random.Generator, dim: int) -> None:
    """One refresh that must recompute (a single appended row makes the stored statistics stale)."""
    queues.propose({"image": rng.normal(size=(1, dim)).astype(np.float32)}, {"image": np.ones(1, bool)})
    assert queues.refresh()


def measure_inference(config: str, batch_sizes: list[int], repeats: int) -> tuple[int, dict[int, Any]]:
    """(DRF width d, {batch size: predict() ms}) for an encoder configuration, all posts with both modalities."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    predictor = bench_predictor(config)
    photos = [predictor.preprocess_image(Image.fromarray(a)) for a in load_sample_images().images]
    dim = int(predictor.reference_stats()["image"].dim)
    times = {}
    for batch in batch_sizes:
        prepared = predictor.prepare(
            [photos[i % len(photos)] for i in range(batch)], [TEXTS[i % len(TEXTS)] for i in range(batch)]
        )
        times[batch] = spread([t * 1e3 for t in time_repeats(partial(predictor.predict, prepared), repeats)])
    return dim, times


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="a running Redis (default: start a private redis-server)")
    parser.add_argument(
        "--config",
        action="append",
        choices=["tiny", "offline", "none"],
        help="repeatable; default tiny, offline",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--infer-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.repeats, args.infer_repeats = [4], 3, 1
    configs = args.config or (["tiny"] if args.smoke else ["tiny", "offline"])

    from stream.local_services import LocalServices, free_port

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="postsense-bench-queues-") as state:
        services = LocalServices(Path(state))
        url = args.redis_url or f"redis://127.0.0.1:{free_port()}/0"
        try:
            services.ensure_redis(url)
            # The brief's reference point (MiniLM width, no model), then each model at its own DRF width.
            plans: list[tuple[str, int, dict[int, Any]]] = [("none (d=384)", 384, {})]
            for config in (c for c in configs if c != "none"):
                try:
                    dim, infer = measure_inference(config, args.batch_sizes, args.infer_repeats)
                except Exception as exc:  # e.g. offline weights not installed: skip that model
                    print(f"skipping {config}: {exc}")
                    continue
                plans.append((config, dim, infer))
            for config, dim, infer in plans:
                for batch in args.batch_sizes:
                    row = {"config": config, **measure_queue(url, dim, batch, args.repeats)}
                    if batch in infer:
                        row["infer_ms"] = infer[batch]
                        row["update_share"] = row["propose_ms"].median / infer[batch].median
                    rows.append(row)
        finally:
            services.stop_all()
    print_table(
        f"Reference-queue update per batch (L = {QUEUE_SIZE}, every feature accepted, both modalities)",
        ["config", "d", "batch", "propose ms", "[p25-p75]", "round trips", "cmds in script", "script µs",
         "infer ms", "update/infer", "refresh ms"],
        [
            [
                r["config"], r["dim"], r["batch_size"], r["propose_ms"].median,
                f"{r['propose_ms'].p25:.3g}-{r['propose_ms'].p75:.3g}", r["round_trips_per_batch"],
                r["commands_inside_script_per_batch"],
                r["script_us_per_call"], r["infer_ms"].median if "infer_ms" in r else "-",
                f"{100 * r['update_share']:.2f} %" if "update_share" in r else "-", r["refresh_ms"].median,
            ]
            for r in rows
        ],
    )  # fmt: skip
    path = write_result(
        "queues", {"queue_size": QUEUE_SIZE, "rows": rows}, smoke=args.smoke, out_dir=args.out
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
