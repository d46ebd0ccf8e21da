"""Print the effective settings as JSON (secrets shown as ********), or just check that they are valid."""

from __future__ import annotations

import argparse
import json

from stream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="only validate; print nothing on success")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.check:
        print(json.dumps(settings.model_dump(mode="json", by_alias=True), indent=2, default=str))
    return 0
