"""The local-services script: start, readiness, idempotence, stop, and a port already taken."""

import socket
import subprocess
import sys

import pytest
import redis

from stream.local_services import LocalServices, ServiceError, free_port, kafka_answers, redis_answers

# Every test here starts or reuses a real Tansu broker or redis-server.
pytestmark = pytest.mark.services


def test_start_ready_idempotent_stop(tmp_path):
    svc = LocalServices(tmp_path)
    bootstrap, url = f"127.0.0.1:{free_port()}", f"redis://127.0.0.1:{free_port()}/0"
    try:
        broker, rds = svc.ensure_broker(bootstrap), svc.ensure_redis(url)
        assert broker.started and rds.started
        assert kafka_answers(bootstrap) and redis.Redis.from_url(url).ping()
        again = svc.ensure_broker(bootstrap)
        assert again.pid == broker.pid  # nothing new started
        assert svc.status()["redis"]["pid"] == rds.pid
    finally:
        assert set(svc.stop_all()) == {"broker", "redis"}
    assert not kafka_answers(bootstrap, timeout_s=1) and not redis_answers(url)
    assert svc.stop_all() == []  # stopping twice is fine


def test_uses_a_server_that_already_answers_and_never_stops_it(tmp_path, services):
    svc = LocalServices(tmp_path)
    ep = svc.ensure_redis(services.redis_url)
    assert not ep.started
    assert svc.stop_all() == []
    assert redis_answers(services.redis_url)


def test_port_taken_by_something_else_is_a_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        svc = LocalServices(tmp_path)
        with pytest.raises(ServiceError, match=f"port {port} on 127.0.0.1 is taken"):
            svc.ensure_broker(f"127.0.0.1:{port}")
        with pytest.raises(ServiceError, match=f"port {port} on 127.0.0.1 is taken"):
            svc.ensure_redis(f"redis://127.0.0.1:{port}/0")
    assert svc.status() == {"broker": None, "redis": None}


def test_remote_server_that_does_not_answer_is_not_started(tmp_path):
    with pytest.raises(ServiceError, match="not local"):
        LocalServices(tmp_path).ensure_redis("redis://10.255.255.1:6379/0")


def test_cli_start_status_stop(tmp_path):
    bootstrap, url = f"127.0.0.1:{free_port()}", f"redis://127.0.0.1:{free_port()}/0"
    base = [sys.executable, "-m", "stream", "--bootstrap-servers", bootstrap, "--redis-url", url, "services"]
    out = subprocess.run(
        base + ["start", "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "started (pid" in out.stdout
    try:
        assert kafka_answers(bootstrap) and redis_answers(url)
    finally:
        out = subprocess.run(
            base + ["stop", "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
        )
    assert "stopped: broker, redis" in out.stdout
