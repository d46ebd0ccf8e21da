"""Security configuration against real peers: Kafka over TLS, Redis with AUTH over TLS, secrets from files.

What can run here: Tansu 0.6 has no working TLS listener in this build (``--cert`` does not start a TLS
handshake) and its ``--authentication`` offers only SCRAM with users stored by the broker, which the memory
engine cannot keep. So Kafka TLS is exercised end to end through a TLS-terminating proxy in front of the
broker (the client side, which is ours, is real: kafka-python with our SSL settings and CA file), and SASL
through a login that the broker refuses, where what matters is that the password never reaches a log line.
The mapping of every SASL/SSL setting onto the client is in tests/connectors/test_kafka_config.py.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import ssl
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
import redis
from helpers import proxied_broker, report_counts, self_signed_certificate, wait_until
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from stream_support import (
    Collector,
    Running,
    cli,
    committed_offsets,
    produce_posts,
    read_topic,
    stream_settings,
    valid_posts,
)

from connectors.kafka import connection_config
from stream.local_services import Endpoints, free_port, kafka_answers, redis_binary
from stream.runtime import Service
from stream.settings import Settings, load_settings

pytestmark = pytest.mark.services

KAFKA_PASSWORD = "kafka-Pw-7f3e9a1c"
REDIS_PASSWORD = "redis-Pw-0b5d2e88"


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def secret_file(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


class Serve:
    """``postsense serve`` as a process with DEBUG logs collected line by line (the most a log can reveal)."""

    def __init__(self, settings: Settings, checkpoint: Path, env: dict[str, str]) -> None:
        command = cli(settings, "serve", checkpoint=checkpoint)
        at = command.index("--redis-url")
        del command[
            at : at + 2
        ]  # the Redis URL (with its password) comes from a file, never the command line
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            command,
            env={**os.environ, "OMP_NUM_THREADS": "1", "POSTSENSE_LOG__LEVEL": "DEBUG", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def metrics_url(self) -> str:
        assert wait_until(lambda: any("metrics on http" in line for line in self.lines), 60), self.output()[
            -2000:
        ]
        port = next(
            re.search(r"metrics on http://[^:]+:(\d+)", line) for line in self.lines if "metrics on" in line
        )
        return f"http://127.0.0.1:{port.group(1)}/metrics"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        finally:
            self.proc.kill()
            self._reader.join(10)
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)


def test_kafka_over_tls_consumes_publishes_and_commits(services, names, predictor, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    broker, proxy = proxied_broker(tmp_path / "broker", tls=tls_server_context(cert, key))
    try:
        assert not kafka_answers(broker.bootstrap, timeout_s=2)  # plaintext clients get nowhere
        settings = stream_settings(
            Endpoints(broker.bootstrap, services.redis_url),
            names,
            partitions=2,
            kafka={"security_protocol": "SSL", "ssl_cafile": str(cert), "ssl_check_hostname": True},
        )
        posts = valid_posts(20, "tls")
        ends = produce_posts(settings, posts)
        collector = Collector()
        with Running(Service(settings, predictor, on_output=collector)):
            assert collector.wait_for(len(posts), timeout_s=60)
            assert wait_until(
                lambda: committed_offsets(settings.kafka, settings.kafka.input_topic) == ends, 20
            )
    finally:
        proxy.stop()
        broker.stop()
    counts = report_counts("kafka over TLS", [p["id"] for p in posts], [d["id"] for d in collector.documents])
    assert counts["lost"] == 0 and counts["duplicated"] == 0


@pytest.fixture
def secured_redis(tmp_path: Path):
    """redis-server with AUTH (requirepass) on a TLS-only port; yields its rediss:// URL."""
    cert, key = self_signed_certificate(tmp_path, "redis")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(redis_binary()),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            REDIS_PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    try:
        assert wait_until(lambda: proc.poll() is None and answers(), 15), "redis-server did not serve TLS"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_with_redis_auth_over_tls_from_a_secret_file_never_logs_or_exports_it(
    services, names, tiny_checkpoint, secured_redis, tmp_path
):
    settings = stream_settings(services, names, partitions=1, redis={"url": secured_redis})
    url_file = secret_file(tmp_path, "redis-url", secured_redis)
    posts = valid_posts(10, "sec")
    produce_posts(settings, posts)
    serve = Serve(settings, tiny_checkpoint, {"POSTSENSE_REDIS__URL_FILE": str(url_file)})
    try:
        metrics_url = serve.metrics_url()
        out = read_topic(settings, settings.kafka.output_topic, expect=len(posts), timeout_s=90)
        assert wait_until(
            lambda: "postsense_redis_up 1.0" in urllib.request.urlopen(metrics_url).read().decode(), 20
        )
        exported = urllib.request.urlopen(metrics_url).read().decode()
        # The queues live in the secured Redis: the worker authenticated over TLS and seeded them.
        assert redis.Redis.from_url(secured_redis).keys(f"{settings.redis.key_prefix}:*")
    finally:
        code = serve.stop()
    logs = serve.output()
    assert code == 0, logs[-3000:]
    assert sorted(r.key.decode() for r in out) == sorted(p["id"] for p in posts)
    assert "DEBUG" in logs  # the most verbose level really ran
    assert REDIS_PASSWORD not in logs and REDIS_PASSWORD not in exported


def test_refused_sasl_login_over_tls_never_logs_the_password(
    services, names, tiny_checkpoint, secured_redis, tmp_path
):
    cert, key = self_signed_certificate(tmp_path)
    broker, proxy = proxied_broker(tmp_path / "broker", tls=tls_server_context(cert, key))
    try:
        settings = stream_settings(
            Endpoints(broker.bootstrap, services.redis_url),
            names,
            partitions=1,
            kafka={"security_protocol": "SSL", "ssl_cafile": str(cert)},
        )  # topics made over plain TLS; the worker below must also log in
        env = {
            "POSTSENSE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "POSTSENSE_KAFKA__SSL_CAFILE": str(cert),
            "POSTSENSE_KAFKA__SASL_MECHANISM": "PLAIN",
            "POSTSENSE_KAFKA__SASL_USERNAME": "postsense",
            "POSTSENSE_KAFKA__SASL_PASSWORD": KAFKA_PASSWORD,  # from the environment (the Redis URL from a file)
            "POSTSENSE_REDIS__URL_FILE": str(secret_file(tmp_path, "redis-url", secured_redis)),
        }
        serve = Serve(settings, tiny_checkpoint, env)
        try:
            metrics_url = serve.metrics_url()
            # Several refused logins and reconnects, at DEBUG (kafka-python logs "SaslHandshake failed" for each).
            assert wait_until(lambda: sum("SaslHandshake failed" in line for line in serve.lines) >= 3, 60), (
                serve.output()[-3000:]
            )
            exported = urllib.request.urlopen(metrics_url).read().decode()
        finally:
            serve.stop()
        config = subprocess.run(
            [*cli(settings, "config")[:1], "config"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proxy.stop()
        broker.stop()
    logs = serve.output()
    assert "sasl" in logs.lower(), logs[-3000:]  # it did try to log in
    assert config.returncode == 0, config.stderr
    assert '"sasl_username": "postsense"' in config.stdout  # the effective settings are shown...
    for secret in (KAFKA_PASSWORD, REDIS_PASSWORD):
        assert secret not in logs and secret not in exported and secret not in config.stdout + config.stderr


def test_kafka_client_debug_logs_never_show_the_sasl_or_ssl_password(caplog):
    # kafka-python's admin client logs its full configuration at DEBUG: `serve --create-topics`, `produce`
    # and the demo build one from our settings before anything else.
    settings = load_settings(
        None,
        {
            "kafka": {
                "bootstrap_servers": [f"127.0.0.1:{free_port()}"],
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "postsense",
                "sasl_password": KAFKA_PASSWORD,
            }
        },
    )
    caplog.set_level(logging.DEBUG)
    caplog.set_level(
        logging.DEBUG, logger="kafka"
    )  # setup_logging (CLI runs in-process) may have quietened it
    with pytest.raises(KafkaError):  # nothing listens there; the configuration is logged first
        KafkaAdminClient(**connection_config(settings.kafka), bootstrap_timeout_ms=300)
    assert "Starting KafkaAdminClient with configuration" in caplog.text
    assert "'sasl_plain_username': 'postsense'" in caplog.text and KAFKA_PASSWORD not in caplog.text
