"""Forward-pass timing of DRFModel: encoders vs the DRF head (projections + converters + fusion + classifier).

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/forward.py [--configs offline tiny] [--batch-sizes 1 2 4 ...]
Prints a table and writes JSON (machine, command, versions, medians and spreads) to bench/results/forward.json.
Every post has both an image and a text, the most expensive case for the head (all three terms of (12)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.inference import Predictor  # noqa: E402
from core.model import PreparedBatch, create_model  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
# Tweet-length texts (~15-30 tokens), so dynamic padding behaves as on real traffic.
TEXTS = [
    "Just got back from the beach and honestly this was the best weekend I have had in months!",
    "Train delayed again for the third time this week, I am so done with this commute.",
    "Not sure how I feel about the new update, some things are better but the battery drains fast.",
    "Look at these flowers in the park this morning, spring is finally here #happy",
]


def sample_images() -> list[Image.Image]:
    """scikit-learn's two sample photos when available, else a synthetic gradient."""
    try:
        from sklearn.datasets import load_sample_image

        return [Image.fromarray(load_sample_image(name)) for name in ("flower.jpg", "china.jpg")]
    except ImportError:
        gradient = np.linspace(0, 255, 480 * 640 * 3).reshape(480, 640, 3).astype(np.uint8)
        return [Image.fromarray(gradient)]


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call; the functions alternate within each repeat so load drift hits them alike."""
    times: dict[str, list[float]] = {key: [] for key in fns}
    for repeat in range(warmup + repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if repeat >= warmup:
                times[key].append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {
        "median": statistics.median(times),
        "p25": q1,
        "p75": q3,
        "min": min(times),
        "max": max(times),
    }


def bench_config(name: str, batch_sizes: list[int], repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(name, LABELS).eval()
    predictor = Predictor.from_model(model)
    photos = [predictor.preprocess_image(image) for image in sample_images()]
    rows = []
    for batch_size in batch_sizes:
        batch: PreparedBatch = predictor.prepare(
            [photos[i % len(photos)] for i in range(batch_size)],
            [TEXTS[i % len(TEXTS)] for i in range(batch_size)],
        )
        with torch.inference_mode():
            v, t = model.encode_batch(batch)
            times = timed(
                {
                    "total": lambda b=batch: model(b),
                    "encoders": lambda b=batch: model.encode_batch(b),
                    "head": lambda b=batch, v=v, t=t: model.forward_features(
                        v, t, b.image_present, b.text_present
                    ),
                },
                repeats,
                warmup,
            )
        total, encoders, head = times["total"], times["encoders"], times["head"]
        row = {
            "encoders": name,
            "batch_size": batch_size,
            "repeats": repeats,
            "total_ms": summary(total),
            "encoders_ms": summary(encoders),
            "head_ms": summary(head),
            "head_share": statistics.median(head) / statistics.median(total),
            "posts_per_s": batch_size / statistics.median(total) * 1e3,
        }
        rows.append(row)
        print(
            f"{name:8s} {batch_size:5d} {row['total_ms']['median']:10.2f} "
            f"[{row['total_ms']['p25']:.2f}-{row['total_ms']['p75']:.2f}] "
            f"{row['encoders_ms']['median']:10.2f} {row['head_ms']['median']:9.3f} "
            f"{100 * row['head_share']:7.2f}% {row['posts_per_s']:9.1f}",
            flush=True,
        )
    return rows


def environment() -> dict:
    def package(name: str) -> str:
        try:
            return version(name)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            return "absent"

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "logical_cpus": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "versions": {
            "python": platform.python_version(),
            **{p: package(p) for p in ("torch", "timm", "transformers", "numpy", "postsense")},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["offline", "tiny"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "forward.json")
    args = parser.parse_args()
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--repeats and --batch-sizes must be positive")

    print(
        f"{'config':8s} {'batch':>5s} {'total ms':>10s} {'[p25-p75]':>13s} {'enc ms':>10s} {'head ms':>9s} "
        f"{'head %':>8s} {'posts/s':>9s}"
    )
    load_at_start = os.getloadavg()[0]  # the machine is shared: record how busy it was
    results = [
        row
        for name in args.configs
        for row in bench_config(name, args.batch_sizes, args.repeats, args.warmup)
    ]
    report = {
        "benchmark": "forward",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **environment(),
        "notes": "head = projections + DRF head on cached encoder features; total = encoders + head; "
        "all posts have both modalities; times in ms, median and quartiles of the repeats",
        "results": results,
        "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
