"""What a new user gets: ``serve`` with default settings against the fastest fp32 configuration, end to end.

Usage: OMP_NUM_THREADS=2 .venv/bin/python -m bench.defaults [--config offline|tiny] [--batch 32] [--posts 384]
       [--smoke]

The checkpoint is made as ``postsense train`` makes it: the model with its encoders' own options (eager torch),
saved, then the fp32 ONNX files ``train`` writes beside it. Each serving configuration loads it as ``serve`` does
(``stream.components.load_predictor``) and consumes the same backlog through the real broker and Redis
(``bench.e2e``'s throughput run; posts/s from the first published batch to the last):

* ``default``: the settings a fresh install has (``model.image_runtime`` and ``text_runtime`` = ``auto``);
* ``checkpoint``: as the checkpoint says, which for a trained one is eager torch (the default before ``auto``);
* ``onnxruntime``: both encoders in ONNX Runtime fp32, named explicitly.

A configuration the encoders cannot take (the tiny test encoders have no ONNX Runtime path) is skipped, and says so.

Two of the three are the same path on a machine with ONNX Runtime, so order and warm-up must not decide: the
configurations run in ``--rounds`` rounds (default 2), the order reversed each round, and each reports its best
round. ``bench.report`` checks default / the fastest fp32 configuration >= 0.9. Prints a table and writes
bench/results/defaults.json.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, local_services, print_table, service_options, write_result  # noqa: E402
from bench.e2e import throughput_run  # noqa: E402

#: Serving configurations: name -> the model settings that differ from a fresh install's.
CONFIGURATIONS: dict[str, dict[str, str]] = {
    "default": {},
    "checkpoint": {"image_runtime": "checkpoint", "text_runtime": "checkpoint"},
    "onnxruntime": {"image_runtime": "onnxruntime", "text_runtime": "onnxruntime"},
}


def trained_checkpoint(config: str, directory: Path) -> Path:
    """A checkpoint as ``postsense train`` leaves it: the encoders' own options, and the files it exports."""
    import torch

    from core.checkpoint import save_checkpoint
    from core.encoders.__main__ import prepare_cpu_serving
    from core.model import create_model

    torch.manual_seed(0)
    path = directory / "model.ckpt"
    save_checkpoint(create_model(config, ["negative", "neutral", "positive"], dim=128), path)
    prepare_cpu_serving(path)
    return path


def serving_predictor(checkpoint: Path, overrides: dict[str, str]) -> Any:
    """The predictor ``serve`` builds from these model settings (on CPU)."""
    from stream.components import load_predictor
    from stream.settings import load_settings

    settings = load_settings(flags={"model": {"device": "cpu", **overrides}})
    return load_predictor(settings, checkpoint)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    service_options(parser)
    parser.add_argument(
        "--config", choices=["offline", "tiny"], default=None, help="encoders (default offline)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--posts", type=int, default=None, help="backlog size per configuration")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=None, help="runs per configuration (default 2; smoke 1)"
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.smoke else 2)
    config = args.config or ("tiny" if args.smoke else "offline")
    posts = args.posts or (40 if args.smoke else 384)
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="postsense-defaults-") as tmp, local_services(args) as endpoints:
        checkpoint = trained_checkpoint(config, Path(tmp))
        predictors = {}
        for name, overrides in CONFIGURATIONS.items():
            try:
                predictors[name] = serving_predictor(checkpoint, overrides)
            except ValueError as exc:  # e.g. the tiny encoders have no ONNX Runtime path
                print(f"{name}: skipped ({exc})", flush=True)
        for round_ in range(rounds):
            for name in list(predictors)[:: -1 if round_ % 2 else 1]:
                predictor = predictors[name]
                run = throughput_run(endpoints, predictor, args.batch, posts, args.decode_workers)
                summary = predictor.runtime_summary()
                print(f"{name}, round {round_ + 1}: {run['posts_per_s']:.1f} posts/s ({summary})", flush=True)
                if name not in best or run["posts_per_s"] > best[name]["posts_per_s"]:
                    best[name] = {"configuration": name, "encoders": summary, "rounds": rounds, **run}
    rows = [best[name] for name in predictors]
    print_table(
        f"serve end to end by settings ({config} encoders, batch {args.batch}, {posts} posts)",
        ["configuration", "encoders", "posts/s", "backlog done"],
        [[r["configuration"], r["encoders"], r["posts_per_s"], r["complete"]] for r in rows],
    )
    path = write_result(
        "defaults",
        {"config": config, "batch": args.batch, "rows": rows},
        smoke=args.smoke,
        out_dir=args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
