"""What every benchmark shares: the workload, the model, local services, statistics, tables and JSON results.

Each ``bench/<name>.py`` measures one thing and calls ``write_result`` so that every JSON file carries the
same provenance (machine, command, versions, time), and ``print_table`` so every table looks alike. The
workload (``make_posts``) is one definition for all of them, so the end-to-end run, the naive loop, the
stage breakdown and the soak push exactly the same kind of posts: ~50 KB JPEG photos, real tweet texts,
and a realistic share of missing or corrupt media (and a few records that are not posts at all).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.local_services import Endpoints, fresh_stream_flags, unique_name

if TYPE_CHECKING:
    from PIL import Image

    from core.inference import Predictor
    from core.model import DRFModel
    from stream.settings import Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Distributions whose versions explain a figure (the JSON records whichever of them are installed).
VERSIONED = (
    "postsense",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "tokenizers",
    "onnxruntime",
    "onnx",
    "kafka-python",
    "crc32c",
    "redis",
    "pillow",
    "numpy",
)


# ------------------------------------------------------------------------------------------- provenance


def machine() -> dict[str, Any]:
    """The machine a figure was measured on; load average says how busy the (shared) CPU was."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def write_result(name: str, results: dict[str, Any], *, smoke: bool, out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (``bench/results`` by default) with provenance around ``results``."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "smoke": smoke,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine(),
        "versions": versions(),
        "offline_image_runtime": os.environ.get(IMAGE_RUNTIME_ENV, "onnxruntime"),
        "offline_encoders": offline_options(),
        "results": results,
    }
    path = out_dir / f"{name}{'.smoke' if smoke else ''}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def command_line() -> str:
    """How this benchmark was started, as a user would type it (``python -m bench.e2e ...``, not a file path)."""
    argv = list(sys.argv)
    script = Path(argv[0]).resolve()
    if script.parent == Path(__file__).resolve().parent:
        argv[0] = "-m bench" if script.stem == "__main__" else f"-m bench.{script.stem}"
    return " ".join([Path(sys.executable).name, *argv])


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes, so ``python -m bench`` can pass them through unchanged."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks the script runs, measures nothing"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    return parser


def service_options(parser: argparse.ArgumentParser) -> None:
    """For benchmarks that need the broker and Redis: use running ones, or start private ones (default)."""
    parser.add_argument(
        "--bootstrap", help="a running Kafka-protocol broker (default: start a private Tansu)"
    )
    parser.add_argument("--redis-url", help="a running Redis (default: start a private redis-server)")


# ------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements (robust to the odd slow run on a shared CPU)."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int


def spread(samples: Sequence[float]) -> Spread:
    if not samples:
        raise ValueError("no samples to summarise")
    ordered = sorted(float(s) for s in samples)
    return Spread(
        median=statistics.median(ordered),
        p25=percentile(ordered, 25),
        p75=percentile(ordered, 75),
        min=ordered[0],
        max=ordered[-1],
        n=len(ordered),
    )


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] (numpy's default method)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def time_repeats(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return times


def synchronize() -> None:
    """Wait for queued GPU work, so a host clock read after it counts that work (a no-op without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- tables


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table (also valid Markdown, so BENCHMARKS.md can quote it verbatim)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# ------------------------------------------------------------------------------------------------ memory


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc (no psutil needed)."""
    current = peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return current, peak


# --------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """The share of each kind of post. Defaults: roughly what a social feed carries (see BENCHMARKS.md)."""

    image_bytes: int = 50_000  # target JPEG size of an image post
    missing_image: float = 0.15  # text-only posts
    corrupt_image: float = 0.05  # undecodable bytes or truncated JPEGs
    missing_text: float = 0.05  # image-only posts
    invalid: float = 0.01  # records that are not posts at all (dead letters)


@cache
def sample_photos() -> tuple[Image.Image, ...]:
    """scikit-learn's two sample photos (CC-BY 2.0): real JPEG statistics, no download."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(array) for array in load_sample_images().images)


@cache
def tweet_texts() -> tuple[str, ...]:
    """The 4,200 human-rated tweets of VADER's ground truth (fetched once by pip, cached under data/)."""
    from core.data.vader import default_data_dir, fetch_sdist, read_rated_tweets

    return tuple(t.text for t in read_rated_tweets(fetch_sdist(default_data_dir() / "cache")))


def _jpeg_near(rng: random.Random, target: int) -> bytes:
    """A random crop of a sample photo, scaled and compressed to within ~15 % of ``target`` bytes."""
    photo = rng.choice(sample_photos())
    w, h = rng.randint(photo.width // 2, photo.width), rng.randint(photo.height // 2, photo.height)
    left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
    crop = photo.crop((left, top, left + w, top + h))
    scale = 1.0
    for _ in range(8):
        size = (max(32, int(crop.width * scale)), max(32, int(crop.height * scale)))
        buf = io.BytesIO()
        crop.resize(size).save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        if abs(len(data) - target) <= 0.15 * target:
            break
        scale *= (target / len(data)) ** 0.5
    return data


def make_posts(
    count: int, seed: int = 0, workload: Workload = Workload(), distinct_images: int = 64
) -> list[bytes]:
    """``count`` input records (JSON bytes, created_at left for the sender to stamp) in a seeded mix.

    ``distinct_images`` JPEGs are rendered and reused round-robin, which keeps start-up fast; every
    post still goes through the full base64 + decode path, so reuse changes no measured cost.
    """
    rng = random.Random(seed)
    texts = tweet_texts()
    images = [_jpeg_near(rng, workload.image_bytes) for _ in range(min(count, distinct_images))]
    records = []
    for i in range(count):
        roll = rng.random()
        if roll < workload.invalid:
            records.append(b'{"id": "broken", "text": ' + str(i).encode())  # truncated JSON
            continue
        roll = rng.random()
        image: dict[str, str] | None
        if roll < workload.missing_image:
            image = None
        elif roll < workload.missing_image + workload.corrupt_image:
            raw = images[i % len(images)]
            raw = raw[: len(raw) // 3] if rng.random() < 0.5 else rng.randbytes(len(raw) // 4)
            image = {"base64": base64.b64encode(raw).decode()}
        else:
            image = {"base64": base64.b64encode(images[i % len(images)]).decode()}
        text = None if rng.random() < workload.missing_text else rng.choice(texts)
        post = {"schema_version": 1, "id": f"bench-{seed}-{i}", "text": text, "image": image}
        records.append(json.dumps(post).encode())
    return records


def stamp_created_at(record: bytes) -> bytes:
    """The record with ``created_at`` = now, so end-to-end latency counts from the send (invalid ones untouched)."""
    from core.contracts import utc_now_iso

    try:
        post = json.loads(record)
    except ValueError:
        return record
    post["created_at"] = utc_now_iso()
    return json.dumps(post).encode()


# ---------------------------------------------------------------------------------------- model, services


#: The offline encoders' CPU inference the benchmarks measure, overridable per run (``python -m bench
#: --image-runtime torch --text-runtime torch --precision fp32``): ONNX Runtime for both encoders (bench/levers.py;
#: same features within ~1e-5) at ``DEFAULT_PRECISION``.
IMAGE_RUNTIME_ENV = "POSTSENSE_BENCH_IMAGE_RUNTIME"
TEXT_RUNTIME_ENV = "POSTSENSE_BENCH_TEXT_RUNTIME"
PRECISION_ENV = "POSTSENSE_BENCH_PRECISION"
#: The offline image encoder's EfficientNet-Lite variant (default: the product's, ``training_options``).
IMAGE_MODEL_ENV = "POSTSENSE_BENCH_IMAGE_MODEL"
#: The device every benchmark's model runs on (default cpu); ``python -m bench.gpu`` sets it to cuda.
DEVICE_ENV = "POSTSENSE_BENCH_DEVICE"
#: A bert-base-uncased ``save_pretrained`` directory (config + tokenizer) for the ``paper`` configuration, which
#: the benchmarks build with random-init weights (its speed does not depend on them).
PAPER_TEXT_ENV = "POSTSENSE_BENCH_PAPER_TEXT_DIR"
#: int8 where bench/parity.py found parity on real posts (BENCHMARKS.md), else fp32.
DEFAULT_PRECISION = "fp32"


def offline_options(precision: str | None = None) -> dict[str, str]:
    """Encoder options of the offline configuration for this run; ``precision`` overrides the run's."""
    from core.encoders.configs import training_options

    return {
        "image_runtime": os.environ.get(IMAGE_RUNTIME_ENV, "onnxruntime"),
        "text_runtime": os.environ.get(TEXT_RUNTIME_ENV, "onnxruntime"),
        "precision": precision or os.environ.get(PRECISION_ENV, DEFAULT_PRECISION),
        "image_model": os.environ.get(IMAGE_MODEL_ENV) or training_options("offline")["image_model"],
    }


def bench_model(config: str, precision: str | None = None) -> DRFModel:
    """A DRF model for encoder configuration ``config`` with an untrained head (speed does not depend on it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from core.data import SENTIMENT_LABELS
    from core.model import create_model

    options = offline_options(precision) if config == "offline" else {}
    if config == "paper" and os.environ.get(PAPER_TEXT_ENV):
        options["text_weights"] = os.environ[PAPER_TEXT_ENV]
    return create_model(
        config, labels=list(SENTIMENT_LABELS), pretrained=config == "offline", encoder_options=options
    )


def bench_predictor(config: str, device: str | None = None, precision: str | None = None) -> Predictor:
    """``bench_model(config, precision)`` ready for inference on ``device`` (default: ``$POSTSENSE_BENCH_DEVICE``
    or cpu)."""
    from core.inference import Predictor

    device = device or os.environ.get(DEVICE_ENV, "cpu")
    return Predictor.from_model(
        bench_model(config, precision), device=device, model_version=f"bench-{config}"
    )


def build_checkpoint(config: str, directory: Path, precision: str | None = None) -> Path:
    """What a deployment's build step makes: a checkpoint of ``bench_model`` in ``directory`` and, when ONNX Runtime
    serves its encoders, their exported files beside it (``python -m core.encoders``), so that the serving process
    measured loads files and never runs the exporter."""
    from core.checkpoint import save_checkpoint
    from core.encoders.__main__ import prepare_onnx
    from core.encoders.sessions import served_by_onnx

    model = bench_model(config, precision)
    checkpoint = directory / "model.ckpt"
    save_checkpoint(model, checkpoint)
    options = model.encoder_options
    runtimes = (options.get("image_runtime", "torch"), options.get("text_runtime", "torch"))
    precision = options.get("precision", "fp32")
    if config == "offline" and any(served_by_onnx(runtime, precision) for runtime in runtimes):
        prepare_onnx(checkpoint, precision)
    return checkpoint


@contextlib.contextmanager
def local_services(args: argparse.Namespace | None = None) -> Iterator[Endpoints]:
    """The broker and Redis named in ``args`` (see ``service_options``), else private ones on free loopback
    ports; only what was started here is stopped on exit."""
    from stream.local_services import LocalServices, free_port

    with tempfile.TemporaryDirectory(prefix="postsense-bench-") as state:
        services = LocalServices(Path(state))
        endpoints = Endpoints(
            getattr(args, "bootstrap", None) or f"127.0.0.1:{free_port()}",
            getattr(args, "redis_url", None) or f"redis://127.0.0.1:{free_port()}/0",
        )
        try:
            services.ensure_broker(endpoints.bootstrap)
            services.ensure_redis(endpoints.redis_url)
            yield endpoints
        finally:
            services.stop_all()


def bench_flags(endpoints: Endpoints, batch: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``fresh_stream_flags`` (own topics, group and key prefix, short group timings) with ``batch`` posts per
    batch; ``sections`` override or add fields per settings section."""
    sections["batch"] = {"max_posts": batch, **sections.get("batch", {})}
    return fresh_stream_flags(endpoints, lambda what: unique_name(f"bench-{what}"), **sections)


def bench_settings(endpoints: Endpoints, batch: int, **sections: dict[str, Any]) -> Settings:
    """``bench_flags`` as a Settings object."""
    from stream.settings import load_settings

    return load_settings(None, bench_flags(endpoints, batch, **sections))
