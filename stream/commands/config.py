"""Print the effective settings as JSON (secrets shown as ********), or just check that they are valid.

When ``model.checkpoint`` names a file, what that model was trained on (``core.provenance``) goes to stderr, so
stdout stays the settings' JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from stream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="only validate; print nothing on success")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.check:
        print(json.dumps(settings.model_dump(mode="json", by_alias=True), indent=2, default=str))
        _describe_checkpoint(settings)
    return 0


def _describe_checkpoint(settings: Settings) -> None:
    from core.checkpoint import CheckpointError
    from core.provenance import DEMO_WARNING, describe, is_demo, read_training

    checkpoint = settings.model.checkpoint
    if checkpoint is None or not checkpoint.is_file():
        return
    try:
        record = read_training(checkpoint)
    except CheckpointError as exc:
        print(f"model.checkpoint {checkpoint}: {exc}", file=sys.stderr)
        return
    print(f"model.checkpoint {checkpoint}: {describe(record)}", file=sys.stderr)
    if is_demo(record):
        print(f"warning: {DEMO_WARNING}", file=sys.stderr)
