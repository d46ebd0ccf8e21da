import json

import pytest
from pydantic import ValidationError

from connectors.config import redact_url
from stream.cli import build_parser, flags_from_args
from stream.settings import Settings, SettingsError, load_settings


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_and_safe():
    s = load_settings()
    assert s.kafka.input_topic == "posts"
    assert s.kafka.heartbeat_interval_ms < s.kafka.session_timeout_ms
    assert s.redis.mode.value == "online"


def test_precedence_file_then_env_then_flags(tmp_path, monkeypatch):
    cfg = write(
        tmp_path,
        "c.toml",
        '[kafka]\ngroup_id = "from-file"\ninput_topic = "file-topic"\n'
        'output_topic = "file-out"\n[batch]\nmax_posts = 8\n',
    )
    monkeypatch.setenv("POSTSENSE_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("POSTSENSE_KAFKA__INPUT_TOPIC", "env-topic")
    s = load_settings(cfg, {"kafka": {"group_id": "from-flag"}})
    assert s.kafka.group_id == "from-flag"  # flag beats env and file
    assert s.kafka.input_topic == "env-topic"  # env beats file
    assert s.kafka.output_topic == "file-out"  # file beats default
    assert s.batch.max_posts == 8


def test_json_config_and_cli_flags(tmp_path):
    cfg = write(tmp_path, "c.json", json.dumps({"batch": {"max_wait_ms": 50}}))
    args, _ = build_parser().parse_known_args(
        [
            "--config",
            str(cfg),
            "--group-id",
            "g1",
            "--bootstrap-servers",
            "a:1,b:2",
            "--set",
            "batch.max_posts=4",
            "--set",
            "redis.mode=frozen",
            "config",
        ]
    )
    s = load_settings(args.config, flags_from_args(args))
    assert s.kafka.bootstrap_servers == ["a:1", "b:2"]
    assert (s.kafka.group_id, s.batch.max_posts, s.batch.max_wait_ms) == ("g1", 4, 50)
    assert s.redis.mode.value == "frozen"


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"kafka": {"session_timeout_ms": 5000, "heartbeat_interval_ms": 6000}}, "heartbeat_interval_ms"),
        ({"kafka": {"security_protocol": "SASL_SSL"}}, "needs sasl_mechanism, sasl_username, sasl_password"),
        ({"kafka": {"sasl_mechanism": "PLAIN"}}, "sasl_mechanism is set but security_protocol is PLAINTEXT"),
        ({"kafka": {"ssl_cafile": "/nonexistent/ca.pem"}}, "ssl_cafile /nonexistent/ca.pem does not exist"),
        ({"batch": {"max_posts": 0}}, "batch.max_posts"),
        ({"model": {"device": "gpu"}}, "model.device"),
        ({"redis": {"url": "http://x"}}, "redis url must start with"),
        ({"kafka": {"no_such_field": 1}}, "kafka.no_such_field"),
    ],
)
def test_validation_errors_name_the_field(flags, needle):
    with pytest.raises(SettingsError) as err:
        load_settings(flags=flags)
    assert needle in str(err.value)


def test_bad_env_value_is_reported(monkeypatch):
    monkeypatch.setenv("POSTSENSE_BATCH__MAX_POSTS", "many")
    with pytest.raises(SettingsError, match="batch.max_posts"):
        load_settings()


def test_bad_config_file_is_reported(tmp_path):
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "c.toml", "[kafka\n"))
    with pytest.raises(SettingsError, match="No such file"):
        load_settings(tmp_path / "missing.toml")


def test_secrets_from_files_and_never_in_dumps(tmp_path):
    pw = write(tmp_path, "pw", "s3cret-pass\n")
    url = write(tmp_path, "url", "redis://user:r3dis-pass@127.0.0.1:6379/0")
    s = load_settings(
        flags={
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "svc",
                "sasl_password_file": str(pw),
            },
            "redis": {"url_file": str(url)},
        }
    )
    assert s.kafka.sasl_password.get_secret_value() == "s3cret-pass"
    dumped = json.dumps(s.model_dump(mode="json"), default=str) + repr(s) + str(s)
    assert "s3cret-pass" not in dumped and "r3dis-pass" not in dumped
    assert s.redis.redacted_url() == "redis://user:***@127.0.0.1:6379/0"


def test_redact_url_keeps_urls_without_password():
    assert redact_url("rediss://host:6380/1") == "rediss://host:6380/1"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"


def test_settings_object_rejects_unknown_sections():
    with pytest.raises(ValidationError, match="nope"):
        Settings(nope={})
