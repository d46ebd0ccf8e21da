"""Optimisation levers on the CPU path, each measured against the current default (keep what pays).

* image encoder (EfficientNet-Lite0): NCHW eager, channels_last (default), bfloat16 autocast (smallest batch,
  one repeat: it is emulated on this CPU), torch.compile (largest batch: every new shape recompiles),
  ONNX Runtime (``image_runtime="onnxruntime"``), and 1 vs 2 threads;
* text encoder (MiniLM-L6): dynamic padding (default) vs fixed padding, bfloat16 autocast, 1 vs 2 threads;
* decoding: JPEG draft mode on/off, decode pool size (threads), Pillow's ``reducing_gap`` resize.

Variants not named by a thread count run with as many threads as the first count measured (2; 1 in smoke runs).
Throughput is items per second of one call on a batch (median and quartiles of the repeats); every variant
also reports its largest absolute difference from the default's output, so a lever that changes results
shows it.

    python -m bench.levers [--batch-sizes 1 16] [--repeats 5] [--skip-compile] [--smoke]
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from bench.common import (
    base_parser,
    bench_predictor,
    make_posts,
    print_table,
    sample_photos,
    spread,
    time_repeats,
    tweet_texts,
    write_result,
)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(
    lever: str, variant: str, batch: int, fn: Callable[[], Any], reference: Any, repeats: int, **extra: Any
) -> dict[str, Any]:
    """Items/s of ``fn`` on a batch of ``batch`` items, and how far its output is from ``reference``."""
    out = fn()
    seconds = time_repeats(fn, repeats, warmup=1)
    diff = float((out.float() - reference.float()).abs().max()) if reference is not None else 0.0
    row = {
        "lever": lever,
        "variant": variant,
        "batch": batch,
        "items_per_s": spread([batch / s for s in seconds]),
        "max_abs_diff": diff,
        **extra,
    }
    print(
        f"  {lever:14s} {variant:34s} batch {batch:3d}: {row['items_per_s'].median:8.1f}/s  diff {diff:.1e}",
        flush=True,
    )
    return row


def image_levers(predictor: Any, batch_sizes: list[int], repeats: int, quick: bool) -> list[dict[str, Any]]:
    """``quick`` (smoke runs) measures one thread count and leaves bfloat16 out (very slow on this CPU)."""
    encoder = predictor.model.image_encoder
    thread_counts = (1,) if quick else (2, 1)
    photos = [predictor.preprocess_image(p) for p in sample_photos()]
    rows = []
    for batch in batch_sizes:
        pixels = torch.stack([photos[i % len(photos)] for i in range(batch)])
        with torch.inference_mode(), threads(thread_counts[0]):  # variants without a count use the first
            reference = encoder(pixels)

            def run(pixels: torch.Tensor = pixels) -> torch.Tensor:
                return encoder(pixels)

            for n in thread_counts:
                with threads(n):
                    rows.append(
                        measure(
                            "image encoder",
                            f"channels_last (default), {n} threads",
                            batch,
                            run,
                            reference,
                            repeats,
                        )
                    )
            encoder.channels_last = False
            encoder.model.to(memory_format=torch.contiguous_format)
            rows.append(measure("image encoder", "NCHW eager", batch, run, reference, repeats))
            encoder.channels_last = True
            encoder.model.to(memory_format=torch.channels_last)

            def bf16(pixels: torch.Tensor = pixels) -> torch.Tensor:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return encoder(pixels)

            # Emulated on CPUs without bfloat16 units (minutes per call at batch 16): once, at the smallest batch.
            if not quick and batch == min(batch_sizes):
                rows.append(
                    measure(
                        "image encoder",
                        "channels_last + bfloat16 autocast",
                        batch,
                        bf16,
                        reference,
                        repeats=1,
                    )
                )
            encoder.runtime = "onnxruntime"
            for n in thread_counts:
                encoder._session = None
                started = time.perf_counter()
                with threads(n):
                    encoder.onnx_session()
                    export_s = time.perf_counter() - started
                    rows.append(
                        measure(
                            "image encoder",
                            f"ONNX Runtime, {n} threads",
                            batch,
                            run,
                            reference,
                            repeats,
                            setup_s=export_s,
                        )
                    )
            encoder.runtime, encoder._session = "torch", None
    return rows


def compiled_lever(predictor: Any, batch: int, repeats: int) -> dict[str, Any]:
    """torch.compile (inductor) of the channels_last backbone; compile time is reported, not hidden."""
    encoder = predictor.model.image_encoder
    photos = [predictor.preprocess_image(p) for p in sample_photos()]
    pixels = torch.stack([photos[i % len(photos)] for i in range(batch)])
    with torch.inference_mode():
        reference = encoder(pixels)
    try:
        compiled = torch.compile(encoder.model)
        sample = pixels.contiguous(memory_format=torch.channels_last)
        started = time.perf_counter()
        with torch.no_grad():
            compiled(sample)
        setup_s = time.perf_counter() - started

        def run() -> torch.Tensor:
            with torch.no_grad():
                return compiled(sample)

        return measure(
            "image encoder", "torch.compile (inductor)", batch, run, reference, repeats, setup_s=setup_s
        )
    except Exception as exc:  # a lever that fails to build is a result, not a crash
        print(f"  torch.compile failed: {type(exc).__name__}: {exc}"[:300])
        return {
            "lever": "image encoder",
            "variant": "torch.compile (inductor)",
            "batch": batch,
            "error": str(exc)[:500],
        }


def text_levers(predictor: Any, batch_sizes: list[int], repeats: int, quick: bool) -> list[dict[str, Any]]:
    encoder = predictor.model.text_encoder
    thread_counts = (1,) if quick else (2, 1)
    texts = list(tweet_texts())
    rows = []
    for batch in batch_sizes:
        chunk = texts[:batch]
        dynamic = encoder.tokenize(chunk)
        # Padded (or cut) to 64 tokens; a cut text loses its [SEP], which only moves the difference column.
        fixed = {
            k: torch.nn.functional.pad(v[:, :64], (0, max(0, 64 - v.shape[1]))) for k, v in dynamic.items()
        }
        with torch.inference_mode(), threads(thread_counts[0]):  # variants without a count use the first
            reference = encoder(dynamic)
            for n in thread_counts:
                with threads(n):
                    rows.append(
                        measure(
                            "text encoder",
                            f"dynamic padding (default), {n} threads",
                            batch,
                            partial(encoder, dynamic),
                            reference,
                            repeats,
                            tokens=int(dynamic["input_ids"].shape[1]),
                        )
                    )
            rows.append(
                measure(
                    "text encoder",
                    "fixed padding to 64",
                    batch,
                    partial(encoder, fixed),
                    reference,
                    repeats,
                    tokens=64,
                )
            )

            def bf16(d: dict[str, torch.Tensor] = dynamic) -> torch.Tensor:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return encoder(d)

            if not quick:
                rows.append(measure("text encoder", "bfloat16 autocast", batch, bf16, reference, repeats))
    return rows


def decode_levers(predictor: Any, posts: int, repeats: int) -> list[dict[str, Any]]:
    """Decode + preprocess of ~50 KB JPEG posts: draft mode, the pool size, and resize's reducing_gap."""
    from dataclasses import replace

    from PIL import Image

    from connectors.media import MediaLimits, decode_image_bytes

    raws = [
        base64.b64decode(doc["image"]["base64"])
        for doc in (json.loads(r) for r in make_posts(posts, seed=1))
        if isinstance(doc, dict) and doc.get("image")
    ]
    limits = MediaLimits()
    no_draft = replace(limits, draft_size=(1 << 20, 1 << 20))
    rows = []

    def decode_all(lim: MediaLimits, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
        def one(raw: bytes) -> torch.Tensor:
            image = decode_image_bytes(raw, lim).image
            return predictor.preprocess_image(image) if image is not None else torch.zeros(0)

        results = list(pool.map(one, raws)) if pool else [one(r) for r in raws]
        return torch.stack([r for r in results if r.numel()])

    reference = decode_all(limits)
    rows.append(
        measure(
            "decode",
            "draft mode (default), 1 thread",
            len(raws),
            lambda: decode_all(limits),
            reference,
            repeats,
        )
    )
    rows.append(
        measure(
            "decode", "no draft mode, 1 thread", len(raws), lambda: decode_all(no_draft), reference, repeats
        )
    )
    for workers in (2, 4):
        with ThreadPoolExecutor(workers) as pool:
            rows.append(
                measure(
                    "decode",
                    f"draft mode, {workers} threads",
                    len(raws),
                    partial(decode_all, limits, pool),
                    reference,
                    repeats,
                )
            )
    images = [decode_image_bytes(r, limits).image for r in raws]
    decoded = [image for image in images if image is not None]
    size = predictor.model.image_encoder.preprocessing.size

    def resize(gap: float | None) -> torch.Tensor:
        out = []
        for image in decoded:
            scale = size / min(image.size)
            target = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
            resized = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=gap)
            out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32)).flatten())
        return torch.cat(out)  # pixel values 0..255

    plain = resize(None)
    rows.append(measure("resize", "bicubic (default)", len(decoded), lambda: resize(None), plain, repeats))
    rows.append(
        measure("resize", "bicubic, reducing_gap=2", len(decoded), lambda: resize(2.0), plain, repeats)
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--skip-compile", action="store_true", help="leave out torch.compile (minutes to build here)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--repeats and --batch-sizes must be positive")
    batch_sizes, repeats = ([1], 1) if args.smoke else (args.batch_sizes, args.repeats)
    predictor = bench_predictor("offline")
    print("levers (items/s, median of repeats):")
    rows = image_levers(predictor, batch_sizes, repeats, quick=args.smoke)
    if not (args.skip_compile or args.smoke):
        rows.append(compiled_lever(predictor, max(batch_sizes), repeats))  # one build: each shape recompiles
    rows += text_levers(predictor, batch_sizes, repeats, quick=args.smoke)
    rows += decode_levers(predictor, 8 if args.smoke else 64, repeats)
    print_table(
        "Levers: throughput and output difference against the default",
        ["lever", "variant", "batch", "items/s", "p25-p75", "max |diff|", "setup s"],
        [
            [
                r["lever"],
                r["variant"],
                r["batch"],
                r["items_per_s"].median if "items_per_s" in r else "failed",
                f"{r['items_per_s'].p25:.3g}-{r['items_per_s'].p75:.3g}" if "items_per_s" in r else "",
                f"{r.get('max_abs_diff', float('nan')):.1e}",
                f"{r['setup_s']:.1f}" if "setup_s" in r else "",
            ]
            for r in rows
        ],
    )
    path = write_result("levers", {"rows": rows}, smoke=args.smoke, out_dir=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
