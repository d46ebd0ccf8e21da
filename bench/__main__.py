"""Run the benchmark suite: ``python -m bench`` (``make bench``), or ``--smoke`` for a quick check that each runs.

Each benchmark runs as its own process (a fair RSS and thread state for each), one after another so they do
not compete for the CPU, against one private broker and Redis started here. Then ``bench.report`` checks the
project's targets against the results and draws the plots. Exit status 1 if any benchmark failed.

``soak-cpu-torch`` is the soak again, shorter, with ``serve`` run by ``scripts/cpu-serve-venv``'s interpreter
(CPU-only torch, as the ``cpu`` image installs it; results in ``OUT/cpu-torch/``); it is skipped, and says so,
where that script finds no CPU wheel.

    python -m bench [--smoke] [--only NAME ...] [--skip NAME ...] [--image-runtime onnxruntime|torch]
                    [--text-runtime onnxruntime|torch] [--precision fp32|int8] [--image-model lite0|lite1|lite2]
                    [--soak-minutes 11] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    IMAGE_MODEL_ENV,
    IMAGE_RUNTIME_ENV,
    PRECISION_ENV,
    RESULTS_DIR,
    TEXT_RUNTIME_ENV,
    local_services,
    print_table,
    service_options,
)

#: name -> (uses the broker, uses Redis, extra arguments of a full run). In run order: models first, services last.
BENCHMARKS: dict[str, tuple[bool, bool, list[str]]] = {
    "forward": (False, False, []),
    "levers": (False, False, []),
    "memory": (False, False, []),
    "queues": (False, True, []),
    "stages": (True, True, []),
    "naive": (True, True, []),
    "e2e": (
        True,
        True,
        ["--batch-sizes", "1", "8", "32", "64", "--posts", "768", "--rounds", "3"],
    ),  # 12 batches of 64
    "defaults": (True, True, []),
    "soak": (True, True, []),
    "soak-cpu-torch": (True, True, ["--minutes", "5"]),
}
#: Benchmarks that run another one's module with other arguments.
MODULES = {"soak-cpu-torch": "soak"}
CPU_SERVE_VENV = Path(__file__).resolve().parents[1] / "scripts" / "cpu-serve-venv"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks every benchmark runs (~2 min)"
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help="run just these")
    parser.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[], metavar="NAME")
    parser.add_argument(
        "--image-runtime",
        choices=["onnxruntime", "torch"],
        help=f"offline image encoder runtime for every benchmark (default onnxruntime; sets {IMAGE_RUNTIME_ENV})",
    )
    parser.add_argument(
        "--text-runtime",
        choices=["onnxruntime", "torch"],
        help=f"offline text encoder runtime for every benchmark (default onnxruntime; sets {TEXT_RUNTIME_ENV})",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        help=f"offline encoders' precision (the naive loop stays fp32; sets {PRECISION_ENV})",
    )
    parser.add_argument(
        "--image-model",
        choices=["lite0", "lite1", "lite2"],
        help=f"offline image encoder's EfficientNet-Lite variant (default the product's, lite1; sets {IMAGE_MODEL_ENV})",
    )
    parser.add_argument(
        "--soak-minutes", type=float, help="length of the soak (default 11, warm-up included)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    service_options(parser)
    return parser.parse_args(argv)


def cpu_serve_python() -> str | None:
    """The CPU-only torch interpreter of ``scripts/cpu-serve-venv`` (made on first use), or None without a wheel."""
    made = subprocess.run([str(CPU_SERVE_VENV)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        print(f"soak-cpu-torch skipped: {made.stderr.strip() or made.returncode}", flush=True)
        return None
    return made.stdout.strip().splitlines()[-1]


def command(name: str, args: argparse.Namespace, bootstrap: str, redis_url: str) -> list[str] | None:
    """The benchmark's command line, or None when what it needs is not at hand here."""
    uses_broker, uses_redis, full = BENCHMARKS[name]
    cmd = [sys.executable, "-m", f"bench.{MODULES.get(name, name)}"]
    cmd += ["--smoke"] if args.smoke else full
    out = args.out
    if name == "soak-cpu-torch":
        python = cpu_serve_python()
        if python is None:
            return None
        cmd += ["--serve-python", python]
        out = (out or RESULTS_DIR) / "cpu-torch"
    if out is not None:
        cmd += ["--out", str(out)]
    if uses_broker:
        cmd += ["--bootstrap", bootstrap]
    if uses_redis:
        cmd += ["--redis-url", redis_url]
    if name.startswith("soak") and args.soak_minutes is not None and not args.smoke:
        cmd += ["--minutes", str(args.soak_minutes)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for value, name in (
        (args.image_runtime, IMAGE_RUNTIME_ENV),
        (args.text_runtime, TEXT_RUNTIME_ENV),
        (args.precision, PRECISION_ENV),
        (args.image_model, IMAGE_MODEL_ENV),
    ):
        if value:
            env[name] = value
    outcomes = []
    with local_services(args) as endpoints:
        for name in names:
            cmd = command(name, args, endpoints.bootstrap, endpoints.redis_url)
            if cmd is None:
                outcomes.append((name, "skipped", 0.0))
                continue
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            started = time.monotonic()
            code = subprocess.run(cmd, env=env, check=False).returncode
            outcomes.append((name, code, time.monotonic() - started))
    print_table("Benchmarks run", ["benchmark", "exit", "seconds"], outcomes)
    from bench.report import report

    report(args.out or RESULTS_DIR, smoke=args.smoke)
    return 1 if any(isinstance(code, int) and code for _, code, _ in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
