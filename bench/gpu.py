"""GPU benchmarks: bare forward and ``serve`` end to end by batch size for the ``offline`` and ``paper``
configurations, the naive loop on the same GPU, GPU utilisation during ``serve``, where a batch's time goes
(decode, host-to-device copy, encoders, publish), and the pinned-memory lever; then the GPU targets.

The measurements are the CPU benchmarks' own scripts (bench.forward, bench.e2e, bench.naive, bench.stages),
run as child processes with the model on the GPU (``POSTSENSE_BENCH_DEVICE``), so GPU and CPU figures come
from one code path. ``paper`` (ViT-B/16 + BERT-base) is built with random-init weights: speed does not depend
on them. Writes ``<out>/<config>/*.json``, ``<out>/<config>/gpu_util.csv`` and ``<out>/gpu.json``.

    python -m bench.gpu [--device cuda] [--configs offline paper] [--smoke] [--out DIR]
                        [--bootstrap HOST:PORT --redis-url URL]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    DEVICE_ENV,
    IMAGE_RUNTIME_ENV,
    PRECISION_ENV,
    RESULTS_DIR,
    TEXT_RUNTIME_ENV,
    base_parser,
    bench_predictor,
    local_services,
    print_table,
    sample_photos,
    service_options,
    spread,
    time_repeats,
    tweet_texts,
    write_result,
)

if TYPE_CHECKING:
    import torch

#: Full-run sizes, chosen so the whole GPU check (install, tests, these) stays within 8 minutes. The first run
#: (2026-12-04, H200) spent 4 of them in e2e at 1,536 posts x 3 batch sizes and never reached stages.
FULL = {
    "forward": ["--batch-sizes", "1", "8", "32", "64", "128", "--repeats", "10"],
    "stages": ["--batch", "64", "--batches", "5"],
    "e2e": [
        "--batch-sizes",
        "32",
        "128",
        "--posts",
        "768",
        "--latency-seconds",
        "5",
        "--decode-workers",
        "8",
    ],
    "naive": ["--posts", "100"],
}
#: With --smoke the children pick their own tiny sizes; e2e is told forward's batch of 4 so the ratio is judged.
SMOKE = {"forward": [], "e2e": ["--batch-sizes", "4"], "naive": [], "stages": []}
TARGET_E2E_VS_FORWARD, TARGET_E2E_VS_NAIVE = 0.8, 10.0


def child_env(device: str) -> dict[str, str]:
    """The children's environment: the device, and on a GPU the offline encoders in torch at float32 weights
    (ONNX Runtime and int8 are CPU levers; ``Predictor`` applies CUDA mixed precision itself)."""
    env = dict(os.environ, **{DEVICE_ENV: device, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if device != "cpu":
        env.update({IMAGE_RUNTIME_ENV: "torch", TEXT_RUNTIME_ENV: "torch", PRECISION_ENV: "fp32"})
    return env


def run_child(name: str, argv: list[str], env: dict[str, str]) -> float:
    """``python -m bench.<name> argv``; raises when it fails. Returns its wall seconds."""
    cmd = [sys.executable, "-m", f"bench.{name}", *argv]
    print(f"--- {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(cmd, env=env, check=True)
    return time.monotonic() - started


class UtilisationSampler:
    """``nvidia-smi`` sampling GPU utilisation and memory every 200 ms into a CSV, while a run lasts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> UtilisationSampler:
        smi = shutil.which("nvidia-smi")
        if smi:
            self.proc = subprocess.Popen(
                [
                    smi,
                    "--query-gpu=timestamp,utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=self.path.open("wb"),
                stderr=subprocess.DEVNULL,
            )
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def summary(self) -> dict[str, Any] | None:
        """Utilisation over the samples taken while the GPU was in use at all (model loading excluded)."""
        if self.proc is None:
            return None
        rows = [line.split(",") for line in self.path.read_text().splitlines() if line.count(",") == 2]
        util = [float(r[1]) for r in rows if r[1].strip().replace(".", "").isdigit()]
        busy = [u for u in util if u > 0] or [0.0]
        memory = [float(r[2]) for r in rows if r[2].strip().replace(".", "").isdigit()]
        return {
            "samples": len(util),
            "busy_samples": len(busy),
            "util_median_busy_pct": statistics.median(busy),
            "util_mean_pct": statistics.fmean(util) if util else None,
            "memory_max_mib": max(memory) if memory else None,
        }


def pinned_lever(config: str, device: str, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Host-to-device copy and whole predict of one batch from pageable vs page-locked host memory."""
    predictor = bench_predictor(config, device)
    photos = [predictor.preprocess_image(p) for p in sample_photos()]
    texts: list[str | None] = list(tweet_texts()[:batch])
    images: list[torch.Tensor | None] = [photos[i % len(photos)] for i in range(batch)]
    rows = []
    for pinned in [False, True] if device != "cpu" else [False]:
        predictor.pin_memory = pinned
        prepared = predictor.prepare(images, texts)
        copy = spread([1e3 * s for s in time_repeats(partial(prepared.to, device), repeats)])
        predict = spread([1e3 * s for s in time_repeats(partial(predictor.predict, prepared), repeats)])
        rows.append(
            {"config": config, "batch": batch, "pinned": pinned, "copy_ms": copy, "predict_ms": predict}
        )
    return rows


def load(out: Path, config: str, name: str, smoke: bool) -> dict[str, Any]:
    return json.loads((out / config / f"{name}{'.smoke' if smoke else ''}.json").read_text())["results"]


def judge(out: Path, configs: list[str], smoke: bool, util: dict[str, Any]) -> dict[str, Any]:
    """Per configuration: serve / bare forward at each batch size measured by both, and serve / naive."""
    verdicts = {}
    for config in configs:
        forward = {r["batch_size"]: r["posts_per_s"] for r in load(out, config, "forward", smoke)["rows"]}
        serve = {
            r["throughput"]["batch"]: r["throughput"]["posts_per_s"]
            for r in load(out, config, "e2e", smoke)["rows"]
        }
        naive = next(
            r["posts_per_s"] for r in load(out, config, "naive", smoke)["runs"] if r["config"] == config
        )
        best_batch = max(serve, key=lambda b: serve[b])
        verdicts[config] = {
            "serve_vs_forward": {b: serve[b] / forward[b] for b in sorted(serve) if b in forward},
            "serve_best_posts_per_s": serve[best_batch],
            "serve_best_batch": best_batch,
            "naive_posts_per_s": naive,
            "serve_vs_naive": serve[best_batch] / naive,
            "gpu_utilisation_during_serve": util.get(config),
        }
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    service_options(parser)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=["offline", "paper", "tiny"],
        default=None,
        help="default offline paper (tiny with --smoke)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out or RESULTS_DIR / "gpu"
    configs = args.configs or (["tiny"] if args.smoke else ["offline", "paper"])
    env = child_env(args.device)
    os.environ.update(env)  # the pinned-memory lever runs here, with the children's settings
    util: dict[str, Any] = {}
    levers: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    with local_services(args) as endpoints:
        services = ["--bootstrap", endpoints.bootstrap, "--redis-url", endpoints.redis_url]
        for config in configs:
            folder = out / config
            folder.mkdir(parents=True, exist_ok=True)
            common = ["--smoke"] if args.smoke else []
            common += ["--out", str(folder)]
            sizes = SMOKE if args.smoke else FULL
            seconds[f"{config}/forward"] = run_child(
                "forward", [*common, "--configs", config, *sizes["forward"]], env
            )
            # stages before e2e: where a batch's time goes is what the first run lacked
            seconds[f"{config}/stages"] = run_child(
                "stages", [*common, "--config", config, *services, *sizes["stages"]], env
            )
            with UtilisationSampler(folder / "gpu_util.csv") as sampler:
                seconds[f"{config}/e2e"] = run_child(
                    "e2e", [*common, "--config", config, *services, *sizes["e2e"]], env
                )
            util[config] = sampler.summary()
            seconds[f"{config}/naive"] = run_child(
                "naive", [*common, "--config", config, *services, *sizes["naive"]], env
            )
            levers += pinned_lever(
                config, args.device, batch=4 if args.smoke else 64, repeats=2 if args.smoke else 20
            )

    verdicts = judge(out, configs, args.smoke, util)
    print_table(
        f"Pinned host memory ({args.device}; ms, median)",
        ["config", "batch", "pinned", "copy ms", "predict ms"],
        [[r["config"], r["batch"], r["pinned"], r["copy_ms"].median, r["predict_ms"].median] for r in levers],
    )
    print_table(
        f"GPU targets ({args.device}): serve >= {TARGET_E2E_VS_FORWARD}x forward, >= {TARGET_E2E_VS_NAIVE}x naive",
        [
            "config",
            "serve/forward by batch",
            "best serve posts/s",
            "naive posts/s",
            "serve/naive",
            "GPU util %",
        ],
        [
            [
                c,
                " ".join(f"{b}:{r:.2f}" for b, r in v["serve_vs_forward"].items()),
                v["serve_best_posts_per_s"],
                v["naive_posts_per_s"],
                v["serve_vs_naive"],
                (v["gpu_utilisation_during_serve"] or {}).get("util_median_busy_pct", "n/a"),
            ]
            for c, v in verdicts.items()
        ],
    )
    path = write_result(
        "gpu",
        {
            "device": args.device,
            "configs": configs,
            "verdicts": verdicts,
            "pinned_lever": levers,
            "seconds": seconds,
            "notes": "paper = ViT-B/16 + BERT-base with random-init weights (speed does not depend on them); "
            "serve/forward compares serve's backlog throughput with the bare forward at the same batch "
            "size; serve/naive uses serve's best batch size",
        },
        smoke=args.smoke,
        out_dir=out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
