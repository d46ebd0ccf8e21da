"""Client configuration from settings: security, delivery guarantees, group behaviour (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.kafka import consumer_config, producer_config
from stream.settings import load_settings


def test_sasl_ssl_credentials_reach_every_client_and_the_password_can_come_from_a_file(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    settings = load_settings(
        None,
        {
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "svc",
                "sasl_password_file": str(secret),
                "ssl_cafile": str(ca),
            }
        },
    )
    for config in (consumer_config(settings.kafka, 8), producer_config(settings.kafka, settings.limits)):
        assert config["security_protocol"] == "SASL_SSL"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert config["sasl_plain_username"] == "svc"
        assert config["sasl_plain_password"] == "s3cret"  # trailing newline of the mounted secret stripped
        assert config["ssl_cafile"] == str(ca)
        assert config["ssl_check_hostname"] is True


def test_plaintext_clients_carry_no_security_fields():
    settings = load_settings(None, {})
    config = consumer_config(settings.kafka, 8)
    assert config["security_protocol"] == "PLAINTEXT"
    assert not [k for k in config if k.startswith(("sasl_", "ssl_"))]


def test_consumer_never_commits_on_its_own_and_takes_group_timing_from_settings():
    settings = load_settings(
        None,
        {"kafka": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "group_instance_id": "pod-0"}},
    )
    config = consumer_config(settings.kafka, max_posts=16)
    assert config["enable_auto_commit"] is False  # offsets only after publishing (at-least-once)
    assert (config["session_timeout_ms"], config["heartbeat_interval_ms"]) == (6000, 1000)
    assert config["group_instance_id"] == "pod-0"  # static membership
    assert config["max_poll_records"] == 16
    assert "group_instance_id" not in consumer_config(load_settings(None, {}).kafka, 16)


def test_producer_is_idempotent_acks_all_and_fits_a_dead_letter_of_the_largest_record():
    settings = load_settings(
        None, {"limits": {"max_record_bytes": 5_000_000}, "kafka": {"produce_timeout_s": 7}}
    )
    config = producer_config(settings.kafka, settings.limits)
    assert config["acks"] == "all" and config["enable_idempotence"] is True
    assert config["max_request_size"] > 5_000_000
    # A send resolves (acknowledged or failed) within the produce timeout, never hangs.
    assert config["delivery_timeout_ms"] >= 7000 and config["max_block_ms"] == 7000


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_compression_none_means_no_codec(compression: str):
    settings = load_settings(None, {"kafka": {"producer_compression": compression}})
    assert producer_config(settings.kafka, settings.limits)["compression_type"] == (
        None if compression == "none" else compression
    )
