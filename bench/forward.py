"""Forward-pass time of DRFModel by batch size: encoders vs the DRF head (projections + converters + fusion +
classifier, eqs. 3-16 minus the losses), for the ``offline`` and ``tiny`` encoder configurations.

Every post carries a real photo (scikit-learn's samples) and a real tweet (VADER's set), the most expensive case
for the head (all three terms of (12)).  The three timings of one batch size alternate within each repeat, so a
burst of load on the shared CPU hits them alike.  The head's share is median(head) / median(total).

    python -m bench.forward [--configs offline tiny] [--batch-sizes 1 2 4 8 16 32 64] [--repeats 7] [--smoke]
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from bench.common import (
    base_parser,
    bench_predictor,
    print_table,
    sample_photos,
    spread,
    time_repeats,
    tweet_texts,
    write_result,
)
from core.model import FeatureTable


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, alternating within each repeat (one untimed warm-up round)."""
    times: dict[str, list[float]] = {key: [] for key in fns}
    for fn in fns.values():
        time_repeats(fn, repeats=0, warmup=1)
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key] += [1e3 * s for s in time_repeats(fn, repeats=1, warmup=0)]
    return times


def bench_config(config: str, batch_sizes: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    predictor = bench_predictor(config)
    model = predictor.model
    images = [predictor.preprocess_image(photo) for photo in sample_photos()]
    texts = tweet_texts()
    rows = []
    for size in batch_sizes:
        batch = predictor.prepare([images[i % len(images)] for i in range(size)], list(texts[:size]))
        batch = batch.to(predictor.device)
        with torch.inference_mode():
            v, t = model.encode_batch(batch)
            ms = interleaved_ms(
                {
                    "total": partial(model, batch),
                    "encoders": partial(model.encode_batch, batch),
                    "head": partial(
                        model.forward_features, FeatureTable(v, t, batch.image_present, batch.text_present)
                    ),
                },
                repeats,
            )
        total, encoders, head = (spread(ms[k]) for k in ("total", "encoders", "head"))
        rows.append(
            {
                "config": config,
                "batch_size": size,
                "total_ms": total,
                "encoders_ms": encoders,
                "head_ms": head,
                "head_share": head.median / total.median,
                "posts_per_s": size / total.median * 1e3,
            }
        )
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=["offline", "tiny"], choices=["offline", "paper", "tiny"]
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--repeats and --batch-sizes must be positive")
    if args.smoke:
        args.configs, args.batch_sizes, args.repeats = ["tiny"], [1, 4], 2

    rows = [row for config in args.configs for row in bench_config(config, args.batch_sizes, args.repeats)]
    print_table(
        f"Forward pass on {torch.get_num_threads()} torch threads (ms, median of {args.repeats}; p25-p75 of total)",
        ["config", "batch", "total", "p25-p75", "encoders", "head", "head %", "posts/s"],
        [
            [
                r["config"],
                r["batch_size"],
                r["total_ms"].median,
                f"{r['total_ms'].p25:.1f}-{r['total_ms'].p75:.1f}",
                r["encoders_ms"].median,
                r["head_ms"].median,
                100 * r["head_share"],
                r["posts_per_s"],
            ]
            for r in rows
        ],
    )
    path = write_result(
        "forward",
        {
            "notes": "head = projections + DRF head on cached encoder features; total = encoders + head; "
            "every post has both modalities; times in ms",
            "rows": rows,
        },
        smoke=args.smoke,
        out_dir=args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
