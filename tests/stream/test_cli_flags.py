"""Global settings flags work before or after the subcommand, as users type them."""

from __future__ import annotations

import json

import pytest

from stream.cli import main


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
