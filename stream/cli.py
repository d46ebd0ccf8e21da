"""The ``postsense`` command: global settings flags, then a subcommand.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args, settings) -> int``;
modules are imported only when their command runs, so ``postsense --help`` stays fast and a
missing optional part (e.g. torch on a config-only box) breaks only the commands that need it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from stream import __version__
from stream.settings import SettingsError, load_settings, parse_override

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "stream.commands.demo",
        "the main job end to end on a local broker and Redis, with live results",
    ),
    "services": ("stream.commands.services", "start, stop or inspect the local broker and Redis"),
    "config": ("stream.commands.config", "print the effective settings (secrets redacted) or check them"),
    "serve": ("stream.commands.serve", "score posts from the input topic as a consumer-group member"),
    "queues": (
        "stream.commands.queues",
        "seed, inspect, snapshot or reset the shared reference queues in Redis",
    ),
    "score": (
        "stream.commands.score",
        "score a JSONL file or a directory of posts without Kafka (backfills, shadow tests)",
    ),
    "produce": ("stream.commands.produce", "send posts from a data set or a JSONL file to a topic"),
    "train": ("stream.commands.train", "train a DRF model and write its checkpoint (model selection on dev)"),
    "evaluate": (
        "stream.commands.evaluate",
        "reproduce the paper's tables and Figure 5 with baselines (Markdown, JSON, PNG)",
    ),
}

# Common flags mapped onto settings fields; anything else goes through --set section.field=value.
FLAG_FIELDS = {
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "group_id": ("kafka", "group_id"),
    "input_topic": ("kafka", "input_topic"),
    "output_topic": ("kafka", "output_topic"),
    "dead_letter_topic": ("kafka", "dead_letter_topic"),
    "checkpoint": ("model", "checkpoint"),
    "device": ("model", "device"),
    "redis_url": ("redis", "url"),
    "metrics_port": ("metrics", "port"),
    "log_level": ("log", "level"),
}


def add_global_flags(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """The settings flags every command takes; ``suppress``: absent ones leave the namespace untouched.

    They are added both before the subcommand (``postsense --group-id x config``) and after it
    (``postsense config --group-id x``); the subcommand's parser suppresses defaults so a flag given
    before it is not reset by the second parse.
    """
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", "-c", default=default, help="settings file (TOML or JSON)")
    parser.add_argument(
        "--set",
        action="append",
        default=argparse.SUPPRESS if suppress else [],
        metavar="SECTION.FIELD=VALUE",
        help="override any setting (repeatable); VALUE is parsed as JSON when it can be",
    )
    parser.add_argument(
        "--bootstrap-servers",
        type=lambda s: s.split(","),
        default=default,
        help="comma-separated host:port list",
    )
    for flag in (
        "--group-id",
        "--input-topic",
        "--output-topic",
        "--dead-letter-topic",
        "--checkpoint",
        "--device",
        "--redis-url",
    ):
        parser.add_argument(flag, default=default)
    parser.add_argument("--metrics-port", type=int, default=default)
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postsense", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"postsense {__version__}")
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(command: str, module: Any) -> argparse.ArgumentParser:
    """The subcommand's own arguments, plus the global settings flags (which may also follow the command)."""
    parser = argparse.ArgumentParser(prog=f"postsense {command}", description=module.__doc__)
    module.add_arguments(parser)
    add_global_flags(parser, suppress=True)
    return parser


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for item in args.set:
        for section, fields in parse_override(item).items():
            flags.setdefault(section, {}).update(fields)
    for attr, (section, field) in FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags.setdefault(section, {})[field] = value
    return flags


def configure_logging(level: str, json_logs: bool) -> None:
    from connectors.logs import setup_logging

    setup_logging(level, json_logs)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[args.command][0])
    cmd_args = command_parser(args.command, module).parse_args(rest)
    for name, value in vars(cmd_args).items():  # settings flags given after the command
        if name == "set":
            args.set = [*args.set, *value]
        elif hasattr(args, name) and name != "command":
            setattr(args, name, value)
    try:
        settings = load_settings(args.config, flags_from_args(args))
    except SettingsError as exc:
        print(f"postsense: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log.level, settings.log.json_logs)
    try:
        code = module.run(cmd_args, settings)
    except KeyboardInterrupt:
        code = 130
    logging.shutdown()
    raise SystemExit(code)
