"""Start, stop or inspect the local Kafka-protocol broker (Tansu) and Redis used by the demo and tests.

`start` uses the configured broker and Redis when they answer and starts local ones on loopback
otherwise; `stop` stops only what `start` started.
"""

from __future__ import annotations

import argparse
import json

from stream.local_services import LocalServices
from stream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", default=".run/services", help="where PID files and service logs go")


def run(args: argparse.Namespace, settings: Settings) -> int:
    services = LocalServices(args.state_dir)
    if args.action == "stop":
        stopped = services.stop_all()
        print("stopped: " + (", ".join(stopped) or "nothing (none was started here)"))
        return 0
    if args.action == "status":
        print(json.dumps(services.status(), indent=2))
        return 0
    return 0 if services.ensure_and_report(settings, "services") else 1
