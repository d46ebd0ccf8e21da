"""Item 5: memory of ``postsense serve`` over a long run at full load (target: RSS flat after warm-up).

Runs the real command (``python -m stream serve``) as a child process against a private broker and Redis,
and keeps its input topic topped up so it never waits for posts: a backlog of ``--backlog`` posts above
what it has consumed (read from its own /metrics), so the topic does not grow without bound either. Every
``--sample-s`` seconds it records the child's resident set (VmRSS) and peak (VmHWM) from /proc, and the
throughput; at the end it stops the child with SIGTERM (it must exit 0) and reports peak RSS, steady RSS
(median after warm-up), its slope in MiB per minute (also over the second half alone: a leak keeps its
slope, allocator warm-up flattens out), and Redis round trips per batch (from Redis's own
command counters against the service's batch count). Also writes a plot of RSS over time.

    python -m bench.soak [--config offline|tiny] [--minutes 11] [--warmup-minutes 2] [--smoke]
                         [--serve-python PYTHON]

``--serve-python`` runs ``serve`` under another interpreter while this one builds the checkpoint, as a
deployment's build step would: ``scripts/cpu-serve-venv`` makes one with CPU-only torch, the ``cpu`` image's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    Endpoints,
    base_parser,
    bench_flags,
    build_checkpoint,
    local_services,
    make_posts,
    print_table,
    service_options,
    spread,
    stamp_created_at,
    write_result,
)

MIB = 2**20
#: The allocator setting deploy/Dockerfile gives the service (two glibc arenas instead of one per thread that
#: allocates: decode pool, model, Kafka IO); the environment overrides it.
SERVE_ENV = {"MALLOC_ARENA_MAX": "2"}


def scrape(port: int) -> dict[str, float]:
    """The child's metrics, summed over labels: {"posts_consumed_total": ..., "batch_size_posts_count": ...}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("postsense_")
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def redis_calls(url: str) -> dict[str, int]:
    """Redis's own per-command call counters (every worker's requests, as Redis saw them)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}
    finally:
        client.close()


def run_soak(
    endpoints: Endpoints,
    config: str,
    batch: int,
    seconds: float,
    warmup_s: float,
    sample_s: float,
    backlog: int,
    checkpoint: Path | None = None,
    serve_python: str = sys.executable,
) -> dict[str, Any]:
    """``checkpoint``: serve this one (its ONNX files built already) instead of building the benchmark's;
    ``serve_python``: the interpreter that runs ``serve``."""
    from connectors.kafka import ensure_topics, make_producer
    from stream.local_services import free_port
    from stream.settings import load_settings

    metrics_port = free_port()
    flags = bench_flags(
        endpoints, batch, metrics={"port": metrics_port, "host": "127.0.0.1"}, log={"level": "WARNING"}
    )
    settings = load_settings(None, flags)
    k = settings.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=6)
    records = make_posts(1000, seed=3)
    producer = make_producer(k, settings.limits)
    with tempfile.TemporaryDirectory(prefix="postsense-soak-") as tmp:
        checkpoint = checkpoint or build_checkpoint(config, Path(tmp))
        flags["model"] = {"checkpoint": str(checkpoint), "device": "cpu"}
        config_file = Path(tmp) / "settings.json"
        config_file.write_text(json.dumps(flags))
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 (closed below, after the child exits)
        child = subprocess.Popen(
            [serve_python, "-m", "stream", "--config", str(config_file), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**SERVE_ENV, **os.environ},
        )
        samples: list[dict[str, float]] = []
        produced = 0
        try:
            started = time.monotonic()
            next_sample = started
            redis_before: dict[str, int] | None = None
            while time.monotonic() - started < seconds:
                if child.poll() is not None:
                    raise RuntimeError(f"serve exited early with code {child.returncode}: {_tail(log.name)}")
                try:
                    metrics = scrape(metrics_port)
                except OSError:
                    metrics = {}  # not listening yet (model loading)
                consumed = metrics.get("posts_consumed_total", 0.0)
                for _ in range(max(0, backlog - int(produced - consumed))):
                    producer.send(k.input_topic, value=stamp_created_at(records[produced % len(records)]))
                    produced += 1
                producer.flush()
                now = time.monotonic()
                if now >= next_sample:
                    rss, hwm = proc_memory(child.pid)
                    elapsed = now - started
                    if redis_before is None and elapsed >= warmup_s:
                        redis_before = redis_calls(endpoints.redis_url)
                        batches_before = metrics.get("batch_size_posts_count", 0.0)
                    samples.append(
                        {
                            "t_s": elapsed,
                            "rss_bytes": rss,
                            "hwm_bytes": hwm,
                            "consumed": consumed,
                            "published": metrics.get("posts_published_total", 0.0),
                            "batches": metrics.get("batch_size_posts_count", 0.0),
                        }
                    )
                    next_sample += sample_s
                time.sleep(0.2)
            redis_after = redis_calls(endpoints.redis_url)
            final = scrape(metrics_port)
            child.send_signal(signal.SIGTERM)
            exit_code = child.wait(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            producer.close()
            log.close()
        if redis_before is None:
            raise RuntimeError("the soak ended before its warm-up did; raise --minutes")
        batches = final.get("batch_size_posts_count", 0.0) - batches_before
        result = summarise(
            config,
            batch,
            samples,
            warmup_s,
            exit_code,
            _round_trips(redis_before, redis_after, batches),
            final,
        )
        return {**result, "serve_python": serve_python, "serve_torch": torch_build(serve_python)}


def torch_build(python: str) -> str:
    """The torch an interpreter imports, e.g. "2.13.0+cpu" or "2.14.1+cu130 (CUDA 13.0)"."""
    probe = "import torch; print(torch.__version__ + (f' (CUDA {torch.version.cuda})' if torch.version.cuda else ''))"
    return subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def _tail(path: str) -> str:
    return Path(path).read_text(errors="replace")[-1500:]


def _round_trips(before: dict[str, int], after: dict[str, int], batches: float) -> dict[str, Any]:
    """Redis commands per batch after warm-up; EVALSHA is the per-batch append, the rest the periodic refresh."""
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    delta = {name: n for name, n in delta.items() if n > 0 and name != "info"}  # our own INFO calls
    total = sum(delta.values())
    return {
        "batches": batches,
        "commands": delta,
        "evalsha_per_batch": delta.get("evalsha", 0) / batches if batches else None,
        "commands_per_batch": total / batches if batches else None,
    }


def summarise(
    config: str,
    batch: int,
    samples: list[dict[str, float]],
    warmup_s: float,
    exit_code: int,
    redis: dict[str, Any],
    final: dict[str, float],
) -> dict[str, Any]:
    steady = [s for s in samples if s["t_s"] >= warmup_s]
    if len(steady) < 2:
        raise RuntimeError(
            "too few samples after warm-up to judge memory; raise --minutes or lower --sample-s"
        )
    minutes = [s["t_s"] / 60 for s in steady]
    rss_mib = [s["rss_bytes"] / MIB for s in steady]
    slope = _slope(minutes, rss_mib)
    half = len(steady) // 2  # a leak keeps its slope; allocator warm-up flattens out
    late_slope = _slope(minutes[half:], rss_mib[half:]) if len(steady) - half >= 2 else slope
    fifth = max(1, len(steady) // 5)
    span = steady[-1]["t_s"] - steady[0]["t_s"]
    return {
        "config": config,
        "batch": batch,
        "duration_s": samples[-1]["t_s"],
        "warmup_s": warmup_s,
        "exit_code": exit_code,
        "posts_per_s_after_warmup": (steady[-1]["published"] - steady[0]["published"]) / span
        if span
        else 0.0,
        "published_total": final.get("posts_published_total", 0.0),
        "dead_lettered_total": final.get("posts_dead_lettered_total", 0.0),
        "peak_rss_mib": max(s["hwm_bytes"] for s in samples) / MIB,
        "steady_rss_mib": spread(rss_mib),
        "rss_slope_mib_per_min": slope,
        "rss_slope_second_half_mib_per_min": late_slope,
        "rss_growth_mib": spread(rss_mib[-fifth:]).median - spread(rss_mib[:fifth]).median,
        "redis": redis,
        "samples": samples,
    }


def _slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y over x."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / var if var else 0.0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s["t_s"] / 60 for s in samples], [s["rss_bytes"] / MIB for s in samples], label="RSS")
    ax.plot(
        [s["t_s"] / 60 for s in samples], [s["hwm_bytes"] / MIB for s in samples], "--", label="peak (VmHWM)"
    )
    ax.axvline(result["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_title(f"postsense serve RSS at full load ({result['config']} encoders, batch {result['batch']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    service_options(parser)
    parser.add_argument(
        "--config", choices=["offline", "tiny"], default=None, help="default offline (smoke: tiny)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=11.0, help="whole run, warm-up included")
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--backlog", type=int, default=256, help="posts kept waiting ahead of the service")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="serve this checkpoint, its ONNX files built beside it (default: build the benchmark's, as a deployment "
        "would)",
    )
    parser.add_argument(
        "--serve-python",
        default=sys.executable,
        help="interpreter that runs serve (default: this one); e.g. scripts/cpu-serve-venv's CPU-only torch",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        config, seconds, warmup_s, sample_s, backlog = args.config or "tiny", 15.0, 5.0, 1.0, 64
    else:
        config, seconds, warmup_s = args.config or "offline", args.minutes * 60, args.warmup_minutes * 60
        sample_s, backlog = args.sample_s, args.backlog
    if seconds <= warmup_s or sample_s <= 0 or args.batch < 1:
        parser.error("--minutes must exceed --warmup-minutes; --sample-s and --batch must be positive")
    with local_services(args) as endpoints:
        result = run_soak(
            endpoints,
            config,
            args.batch,
            seconds,
            warmup_s,
            sample_s,
            backlog,
            args.checkpoint,
            args.serve_python,
        )
    redis = result["redis"]
    print_table(
        f"Soak: postsense serve for {result['duration_s'] / 60:.1f} min at full load ({config}, batch {args.batch}, "
        f"torch {result['serve_torch']})",
        [
            "posts/s",
            "peak RSS MiB",
            "steady RSS MiB",
            "slope MiB/min",
            "2nd-half slope",
            "growth MiB",
            "EVALSHA/batch",
            "Redis cmds/batch",
            "exit",
        ],
        [
            [
                result["posts_per_s_after_warmup"],
                result["peak_rss_mib"],
                result["steady_rss_mib"].median,
                f"{result['rss_slope_mib_per_min']:+.2f}",
                f"{result['rss_slope_second_half_mib_per_min']:+.2f}",
                f"{result['rss_growth_mib']:+.1f}",
                redis["evalsha_per_batch"],
                redis["commands_per_batch"],
                result["exit_code"],
            ]
        ],
    )
    print(
        "EVALSHA counts the per-batch append and the refresher's compare-and-set of the statistics (every "
        "refresh interval); Redis commands include those run inside the scripts."
    )
    out_dir = args.out or RESULTS_DIR
    path = write_result("soak", result, smoke=args.smoke, out_dir=out_dir)
    png = out_dir / f"soak_rss{'.smoke' if args.smoke else ''}.png"
    plot(result, png)
    print(f"wrote {path} and {png}")
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
