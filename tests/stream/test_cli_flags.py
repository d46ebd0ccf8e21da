"""Global settings flags work before or after the subcommand, as users type them; each command's --help lists
only the settings flags it reads."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from stream.cli import main
from stream.settings import Settings


def effective(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_global_flags_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    settings = effective(capsys, ["config", "--group-id", "after", "--set", "batch.max_posts=3"])
    assert settings["kafka"]["group_id"] == "after"
    assert settings["batch"]["max_posts"] == 3


def test_flags_before_and_after_combine_and_the_later_position_wins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = effective(
        capsys,
        [
            "--group-id",
            "before",
            "--set",
            "batch.max_wait_ms=7",
            "--input-topic",
            "in-before",
            "config",
            "--group-id",
            "after",
            "--set",
            "batch.max_posts=5",
        ],
    )
    assert settings["kafka"]["group_id"] == "after"
    assert settings["kafka"]["input_topic"] == "in-before"  # not reset by the subcommand's parse
    assert (settings["batch"]["max_wait_ms"], settings["batch"]["max_posts"]) == (7, 5)


def test_config_file_after_the_subcommand(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\noutput_topic = "from-file"\n')
    settings = effective(capsys, ["config", "-c", str(cfg)])
    assert settings["kafka"]["output_topic"] == "from-file"


def test_a_bad_flag_after_the_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["config", "--log-level", "LOUD"])
    assert exit_.value.code == 2
    assert "--log-level" in capsys.readouterr().err


SETTINGS_FLAGS = {
    "--bootstrap-servers",
    "--group-id",
    "--input-topic",
    "--output-topic",
    "--dead-letter-topic",
    "--checkpoint",
    "--device",
    "--redis-url",
    "--metrics-port",
}


def help_flags(capsys: pytest.CaptureFixture[str], command: str) -> set[str]:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))


@pytest.mark.parametrize(
    "command, reads",
    [
        ("evaluate", set()),
        ("train", {"--device"}),
        ("score", {"--checkpoint", "--device"}),
        ("queues", {"--checkpoint", "--redis-url"}),
        ("produce", {"--bootstrap-servers", "--input-topic"}),
        ("services", {"--bootstrap-servers", "--redis-url"}),
        ("demo", {"--bootstrap-servers", "--checkpoint", "--device", "--redis-url"}),
        ("serve", SETTINGS_FLAGS),
        ("config", SETTINGS_FLAGS),
    ],
)
def test_each_command_s_help_lists_only_the_settings_flags_it_reads(
    capsys: pytest.CaptureFixture[str], command: str, reads: set[str]
) -> None:
    flags = help_flags(capsys, command)
    assert flags & SETTINGS_FLAGS == reads
    assert {"--config", "--set", "--log-level"} <= flags  # every command takes these


def test_a_settings_flag_after_a_command_that_ignores_it_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--out", "reports/x", "--bootstrap-servers", "kafka:9092"])
    assert exit_.value.code == 2
    assert "--bootstrap-servers does not apply" in capsys.readouterr().err


def test_flags_a_command_reads_work_after_it_and_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.commands import score

    seen: list[Settings] = []

    def run(args: argparse.Namespace, settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(score, "run", run)
    for argv in (
        ["score", "in.jsonl", "--out", "o.jsonl", "--checkpoint", "m.ckpt", "--device", "cpu"],
        ["--checkpoint", "m.ckpt", "--device", "cpu", "score", "in.jsonl", "--out", "o.jsonl"],
        [
            "--redis-url",
            "redis://r:6379/0",
            "--checkpoint",
            "m.ckpt",
            "--device",
            "cpu",
            "score",
            "in.jsonl",
            "--out",
            "o.jsonl",
        ],  # before the command, a flag it does not read is taken (and changes nothing)
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    assert [(s.model.checkpoint, s.model.device) for s in seen] == [(Path("m.ckpt"), "cpu")] * 3
