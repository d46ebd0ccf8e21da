"""Where the serving process's memory goes: RSS (anonymous and file-backed) after each step of loading and serving.

Imports, the model, the ONNX Runtime sessions (from the on-disk export cache: warm it with one earlier run, as a
deployment does at build time), then batches of real-photo posts through ``Predictor.predict``. Each step's
growth is what it costs; the soak (bench/soak.py) shows whether it stays flat.

    python -m bench.memory [--precision fp32|int8] [--batch 32] [--batches 20] [--smoke]
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import base_parser, print_table, write_result


def rss_mib() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(line.split()[1]) / 1024
    return fields


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "int8"], default=None, help="default: the run's")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = [("start", rss_mib())]
    import torch
    import transformers  # noqa: F401
    steps.append(("import torch, transformers", rss_mib()))
    from bench.common import bench_predictor, sample_photos, tweet_texts
    from core.inference import Predictor  # noqa: F401  (what serve imports)

    steps.append(("import core.inference", rss_mib()))
    config = "tiny" if args.smoke else "offline"
    predictor = bench_predictor(config, precision=args.precision)
    steps.append((f"{config} model", rss_mib()))
    model = predictor.model
    for name in ("text", "image"):
        encoder = getattr(model, f"{name}_encoder")
        if hasattr(encoder, "onnx_session") and (encoder.runtime == "onnxruntime" or encoder.precision == "int8"):
            encoder.onnx_session()
            steps.append((f"{name} ONNX Runtime session", rss_mib()))
    photos = [predictor.preprocess_image(photo) for photo in sample_photos()]
    texts = list(tweet_texts())
    batches = 2 if args.smoke else args.batches
    for i in range(batches):
        rows = range(i * args.batch, (i + 1) * args.batch)
        predictor.predict(predictor.prepare([photos[r % len(photos)] for r in rows], [texts[r] for r in rows]))
        if i in (0, batches - 1):
            steps.append((f"after {i + 1} batch{'es' if i else ''} of {args.batch}", rss_mib()))
    print_table(
        f"RSS of one serving process ({config}, {model.encoder_options}, {torch.get_num_threads()} threads), MiB",
        ["step", "RSS", "anonymous", "file-backed"],
        [[name, m["VmRSS"], m["RssAnon"], m["RssFile"]] for name, m in steps],
    )
    path = write_result(
        "memory",
        {"config": config, "encoder_options": model.encoder_options, "batch": args.batch,
         "steps": [{"step": name, **m} for name, m in steps]},
        smoke=args.smoke,
        out_dir=args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
