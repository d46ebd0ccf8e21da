"""The ``postsense`` command: global settings flags, then a subcommand.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args, settings) -> int``;
modules are imported only when their command runs, so ``postsense --help`` stays fast and a
missing optional part (e.g. torch on a config-only box) breaks only the commands that need it.
The settings flags go before the command (all are accepted there) or after it, where only the ones that
command reads (``COMMANDS[name].flags``, the ones its ``--help`` lists) are accepted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, NamedTuple

from stream import __version__
from stream.settings import SettingsError, load_settings, parse_override


class Command(NamedTuple):
    module: str
    help: str
    #: The settings flags the command reads, besides --config, --set and --log-level (which every command
    #: takes): its --help lists these, and after the command only these are accepted.
    flags: tuple[str, ...]


KAFKA_FLAGS = ("--bootstrap-servers", "--group-id", "--input-topic", "--output-topic", "--dead-letter-topic")
MODEL_FLAGS = ("--checkpoint", "--device")
ALL_FLAGS = (*KAFKA_FLAGS, *MODEL_FLAGS, "--redis-url", "--metrics-port")

COMMANDS: dict[str, Command] = {
    "demo": Command(
        "stream.commands.demo",
        "the main job end to end on a local broker and Redis, with live results",
        # Its topics and group are fresh per run; it serves no metrics endpoint.
        ("--bootstrap-servers", *MODEL_FLAGS, "--redis-url"),
    ),
    "services": Command(
        "stream.commands.services",
        "start, stop or inspect the local broker and Redis",
        ("--bootstrap-servers", "--redis-url"),
    ),
    "config": Command(
        "stream.commands.config", "print the effective settings (secrets redacted) or check them", ALL_FLAGS
    ),
    "serve": Command(
        "stream.commands.serve", "score posts from the input topic as a consumer-group member", ALL_FLAGS
    ),
    "queues": Command(
        "stream.commands.queues",
        "seed, inspect, snapshot or reset the shared reference queues in Redis",
        ("--checkpoint", "--redis-url"),  # the checkpoint is read on the CPU: model.device does not apply
    ),
    "score": Command(
        "stream.commands.score",
        "score a JSONL file or a directory of posts without Kafka (backfills, shadow tests)",
        MODEL_FLAGS,
    ),
    "produce": Command(
        "stream.commands.produce",
        "send posts from a data set or a JSONL file to a topic",
        ("--bootstrap-servers", "--input-topic"),
    ),
    "train": Command(
        "stream.commands.train",
        "train a DRF model and write its checkpoint (model selection on dev)",
        ("--device",),
    ),
    "evaluate": Command(
        "stream.commands.evaluate",
        "reproduce the paper's tables and Figure 5 with baselines (Markdown, JSON, PNG)",
        (),  # it runs on the CPU features cache: no service setting applies
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

#: Each settings flag's argparse options (besides its default).
_FLAG_OPTIONS: dict[str, dict[str, Any]] = {
    "--bootstrap-servers": {
        "type": lambda s: s.split(","),
        "metavar": "HOST:PORT,...",
        "help": "kafka.bootstrap_servers (comma-separated)",
    },
    "--group-id": {"help": "kafka.group_id"},
    "--input-topic": {"help": "kafka.input_topic"},
    "--output-topic": {"help": "kafka.output_topic"},
    "--dead-letter-topic": {"help": "kafka.dead_letter_topic"},
    "--checkpoint": {"metavar": "PATH", "help": "model.checkpoint"},
    "--device": {"help": "model.device: auto, cpu or cuda[:N]"},
    "--redis-url": {"metavar": "URL", "help": "redis.url"},
    "--metrics-port": {"type": int, "metavar": "PORT", "help": "metrics.port"},
}


def add_global_flags(
    parser: argparse.ArgumentParser, *, suppress: bool = False, flags: tuple[str, ...] = ALL_FLAGS
) -> None:
    """--config, --set, --log-level and the settings ``flags``; ``suppress``: absent ones leave the namespace untouched.

    They are added both before the subcommand (``postsense --group-id x config``, all of them) and after it
    (``postsense config --group-id x``, those the command reads); the subcommand's parser suppresses defaults
    so a flag given before it is not reset by the second parse.
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
    for flag in flags:
        parser.add_argument(flag, default=default, **_FLAG_OPTIONS[flag])
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=default, help="log.level"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postsense",
        description=__doc__.splitlines()[0],
        epilog="The settings flags go before or after the command; `postsense COMMAND --help` lists the ones "
        "that command reads.",
    )
    parser.add_argument("--version", action="version", version=f"postsense {__version__}")
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def command_parser(command: str, module: Any) -> argparse.ArgumentParser:
    """The subcommand's own arguments, plus the settings flags it reads (which may also follow the command)."""
    parser = argparse.ArgumentParser(prog=f"postsense {command}", description=module.__doc__)
    module.add_arguments(parser)
    add_global_flags(parser, suppress=True, flags=COMMANDS[command].flags)
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
    module = importlib.import_module(COMMANDS[args.command].module)
    cmd_parser = command_parser(args.command, module)
    cmd_args, unknown = cmd_parser.parse_known_args(rest)
    if unknown:
        unused = [flag for flag in (u.split("=", 1)[0] for u in unknown) if flag in ALL_FLAGS]
        if unused:
            cmd_parser.error(
                f"{unused[0]} does not apply to this command (its --help lists the settings flags it reads)"
            )
        cmd_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
