"""Where the serving process's memory goes: RSS (anonymous and file-backed) after each step of loading and serving.

What ``serve`` does, in a fresh process: imports, ``Predictor.from_checkpoint`` (on CPU, the encoders ONNX Runtime
serves are loaded inference-only from the files beside the checkpoint), then batches of real-photo posts through
``predict``. The checkpoint and its ONNX files are made first in this process, as a deployment's build step would
(``python -m core.encoders CHECKPOINT``), so the exporter's memory is not counted. Each step's growth is what it
costs; the soak (bench/soak.py) shows whether it stays flat. tracemalloc cannot see this: it is native memory.

    python -m bench.memory [--precision fp32|int8] [--batch 32] [--batches 20] [--smoke]
    python -m bench.memory --checkpoint CKPT        # measure an existing checkpoint (its ONNX files made already)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import base_parser, build_checkpoint, print_table, write_result


def rss_mib() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(line.split()[1]) / 1024
    return fields


def measure(
    checkpoint: Path, batch: int, batches: int
) -> tuple[list[tuple[str, dict[str, float]]], dict[str, Any]]:
    """RSS after each step of serving ``checkpoint`` on CPU, and its encoder options; call in a fresh process
    (imports are steps)."""
    steps = [("start", rss_mib())]
    import torch  # noqa: F401

    steps.append(("import torch", rss_mib()))
    from bench.common import sample_photos, tweet_texts
    from core.inference import Predictor  # what serve imports

    steps.append(("import core.inference", rss_mib()))
    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    steps.append(("Predictor.from_checkpoint (model + ONNX Runtime sessions)", rss_mib()))
    photos = [predictor.preprocess_image(photo) for photo in sample_photos()]
    texts = list(tweet_texts())
    steps.append(("the benchmark's photos and tweets loaded (scikit-learn; not serving)", rss_mib()))
    for i in range(batches):
        rows = range(i * batch, (i + 1) * batch)
        predictor.predict(
            predictor.prepare([photos[r % len(photos)] for r in rows], [texts[r] for r in rows])
        )
        if i in (0, batches - 1):
            steps.append((f"after {i + 1} batch{'es' if i else ''} of {batch}", rss_mib()))
    return steps, predictor.model.encoder_options


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "int8"], default=None, help="default: the run's")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="measure this checkpoint (default: build one)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = "tiny" if args.smoke else "offline"
    if args.checkpoint is None:
        with tempfile.TemporaryDirectory(prefix="postsense-memory-") as tmp:
            checkpoint = build_checkpoint(config, Path(tmp), args.precision)
            # A fresh process measures, so neither the build nor its imports are counted.
            raise SystemExit(
                subprocess.run(
                    [sys.executable, "-m", "bench.memory", *sys.argv[1:], "--checkpoint", str(checkpoint)],
                    check=False,
                ).returncode
            )
    batches = 2 if args.smoke else args.batches
    steps, encoder_options = measure(args.checkpoint, args.batch, batches)
    import torch

    print_table(
        f"RSS of one serving process ({config}, {encoder_options}, {torch.get_num_threads()} threads), MiB",
        ["step", "RSS", "anonymous", "file-backed"],
        [[name, m["VmRSS"], m["RssAnon"], m["RssFile"]] for name, m in steps],
    )
    path = write_result(
        "memory",
        {
            "config": config,
            "encoder_options": encoder_options,
            "batch": args.batch,
            "steps": [{"step": name, **m} for name, m in steps],
        },
        smoke=args.smoke,
        out_dir=args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
