"""Run the benchmark suite: ``python -m bench`` (``make bench``), or ``--smoke`` for a quick check that each runs.

Each benchmark runs as its own process (a fair RSS and thread state for each), one after another so they do
not compete for the CPU, against one private broker and Redis started here. Then ``bench.report`` checks the
issue's targets against the results and draws the plots. Exit status 1 if any benchmark failed.

    python -m bench [--smoke] [--only NAME ...] [--skip NAME ...] [--image-runtime onnxruntime|torch]
                    [--text-runtime onnxruntime|torch] [--precision fp32|int8]
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
    "e2e": (True, True, ["--batch-sizes", "1", "8", "32", "64"]),
    "soak": (True, True, []),
}


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
        "--soak-minutes", type=float, help="length of the soak (default 11, warm-up included)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    service_options(parser)
    return parser.parse_args(argv)


def command(name: str, args: argparse.Namespace, bootstrap: str, redis_url: str) -> list[str]:
    uses_broker, uses_redis, full = BENCHMARKS[name]
    cmd = [sys.executable, "-m", f"bench.{name}"]
    cmd += ["--smoke"] if args.smoke else full
    if args.out is not None:
        cmd += ["--out", str(args.out)]
    if uses_broker:
        cmd += ["--bootstrap", bootstrap]
    if uses_redis:
        cmd += ["--redis-url", redis_url]
    if name == "soak" and args.soak_minutes is not None and not args.smoke:
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
    ):
        if value:
            env[name] = value
    outcomes = []
    with local_services(args) as endpoints:
        for name in names:
            cmd = command(name, args, endpoints.bootstrap, endpoints.redis_url)
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            started = time.monotonic()
            code = subprocess.run(cmd, env=env, check=False).returncode
            outcomes.append((name, code, time.monotonic() - started))
    print_table("Benchmarks run", ["benchmark", "exit", "seconds"], outcomes)
    from bench.report import report

    report(args.out or RESULTS_DIR, smoke=args.smoke)
    return 1 if any(code for _, code, _ in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
