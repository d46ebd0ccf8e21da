"""Shared helpers (no tests here) for the fault, hostile-input and security tests.

Fault tests that restart or break a broker must not disturb the session broker other tests share, so
they get their own processes from here: a Tansu broker (memory or S3 engine), an ``s3rver`` for the
persistent engine, and a Kafka-protocol TCP proxy that can terminate TLS and refuse produce requests
(a real network fault for the producer alone, while the consumer keeps working). Every process is
started here, recorded by its PID and stopped by that PID only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from connectors.metrics import PREFIX, Metrics
from stream.local_services import free_port, kafka_answers, port_open, tansu_binary
from stream.settings import Settings

#: Kafka API key of a Produce request (the first two bytes of every request body).
PRODUCE_API_KEY = 0


def report_counts(
    name: str, posts_in: Iterable[str], out_ids: Iterable[str], dead_lettered: int = 0
) -> dict[str, int]:
    """Print (for ``pytest -s``) and return the fault test's ledger: in, out, dead-lettered, duplicated, lost."""
    expected = Counter(posts_in)
    seen = Counter(out_ids)
    counts = {
        "in": sum(expected.values()),
        "out": sum(seen.values()),
        "dead_lettered": dead_lettered,
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "lost": sum(1 for post in expected if post not in seen),
        "unexpected": sum(1 for post in seen if post not in expected),
    }
    print(f"\n[counts] {name}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def sample_value(metrics: Metrics, name: str, **labels: str) -> float:
    """``postsense_<name>{labels}`` now, through the registry's public API (``get_sample_value``).

    A labelled series never touched yet is absent from the registry; it reads as 0, like a counter that never
    counted (which is what a test asking "how many lost partitions?" means).
    """
    value = metrics.registry.get_sample_value(f"{PREFIX}_{name}", labels)
    return 0.0 if value is None else value


def wait_until(check, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``check()`` until it is truthy or the timeout passes; returns its last verdict."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return bool(check())


def _refuse_constant(token: str) -> NoReturn:
    raise ValueError(f"bare {token} token: not JSON (RFC 8259), a strict parser rejects it")


def strict_json(text: str | bytes) -> Any:
    """Parse ``text`` as a strict JSON parser would: the ``NaN``, ``Infinity`` and ``-Infinity`` tokens that
    Python's parser accepts (and ``json.dumps`` writes by default) raise ValueError."""
    return json.loads(text, parse_constant=_refuse_constant)


def strict_json_lines(path: Path) -> list[Any]:
    """Every line of a JSONL file, each parsed by :func:`strict_json`."""
    return [strict_json(line) for line in path.read_bytes().splitlines()]


def _stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class S3Server:
    """``s3rver`` (npm) on a free loopback port with a ``tansu`` bucket: the storage of a persistent broker."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        """$POSTSENSE_S3RVER, then s3rver on PATH, then the project-local install under .run/node."""
        local = Path(__file__).resolve().parent.parent / ".run/node/node_modules/.bin/s3rver"
        candidates = [os.environ.get("POSTSENSE_S3RVER"), shutil.which("s3rver"), str(local)]
        return next((c for c in candidates if c and Path(c).exists()), None)

    def start(self) -> S3Server:
        binary = self.binary()
        assert binary, "s3rver missing: npm install --prefix .run/node s3rver@3.7.1"
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(
            self.directory.parent / "s3rver.log", "ab"
        )  # closed here; the child keeps its own descriptor
        self.proc = subprocess.Popen(
            [
                binary,
                "-d",
                str(self.directory),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--configure-bucket",
                "tansu",
                "--allow-mismatched-signatures",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        assert wait_until(lambda: port_open("127.0.0.1", self.port), 30), "s3rver did not start"
        return self

    def engine_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "S3RVER",
            "AWS_SECRET_ACCESS_KEY": "S3RVER",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)


class Broker:
    """A Tansu broker of the test's own: listens on ``port``, advertises ``advertised_port`` (a proxy's, if any)."""

    def __init__(
        self,
        state_dir: Path,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.storage = storage
        self.env = env or {}
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self, wait: bool = True) -> Broker:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "broker.log", "ab")  # closed here; the child keeps its own descriptor
        self.proc = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                self.storage,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "RUST_LOG": "warn", **self.env},
        )
        log.close()
        if wait:
            assert wait_until(lambda: port_open("127.0.0.1", self.port), 30), "broker did not listen"
            if self.advertised_port == self.port:
                assert wait_until(lambda: kafka_answers(self.bootstrap, 2.0), 30), "broker did not answer"
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (SIGKILL: as a crash would, with nothing flushed)."""
        if self.proc is not None:
            _stop_pid(self.proc, sig)
            self.proc = None

    def restart(self, sig: int = signal.SIGTERM, down_s: float = 0.0) -> None:
        self.stop(sig)
        time.sleep(down_s)  # how long the outage lasts: the fault under test, not a wait
        self.start()


class KafkaProxy:
    """A TCP proxy in front of a broker that advertises the proxy's port, so every client connection passes here.

    ``tls``: terminate TLS with this server context (clients speak SSL, the broker plaintext).
    ``refuse_produce_from``: while set to a client id, a connection on which that client sends a Produce
    request is cut before the broker sees it, so that client's publishing fails with real network errors
    while its fetches, commits and heartbeats, and every other client, go on.
    """

    def __init__(self, upstream_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.tls = tls
        self.refuse_produce_from: str | None = None
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="kafka-proxy", daemon=True)

    def start(self) -> KafkaProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.tls), self._loop
        )
        self._server = started.result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        requests = asyncio.ensure_future(self._requests(client_r, broker_w))
        responses = asyncio.ensure_future(self._copy(broker_r, client_w))
        await asyncio.wait([requests, responses], return_when=asyncio.FIRST_COMPLETED)
        for task in (requests, responses):
            task.cancel()
        for writer in (client_w, broker_w):
            with contextlib.suppress(Exception):
                writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward whole request frames (size, then body), cutting the connection on a refused Produce."""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">i", size)[0])
                if self._refused(body):
                    self.refused += 1
                    return
                writer.write(size + body)
                await writer.drain()

    def _refused(self, body: bytes) -> bool:
        """Request header: api_key int16, api_version int16, correlation_id int32, client_id (int16 length, bytes)."""
        refused = self.refuse_produce_from
        if refused is None or struct.unpack(">h", body[:2])[0] != PRODUCE_API_KEY:
            return False
        length = struct.unpack(">h", body[8:10])[0]
        return body[10 : 10 + max(length, 0)].decode(errors="replace") == refused

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()


def self_signed_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key (openssl), for TLS listeners in tests."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def proxied_broker(directory: Path, tls: ssl.SSLContext | None = None) -> tuple[Broker, KafkaProxy]:
    """A broker of the test's own whose every client connection passes through a KafkaProxy."""
    broker = Broker(directory)
    proxy = KafkaProxy(broker.port, tls).start()
    broker.advertised_port = proxy.port
    broker.start()
    if tls is None:
        assert wait_until(lambda: kafka_answers(broker.bootstrap, 2.0), 30), "proxied broker did not answer"
    return broker, proxy


def as_client(settings: Settings, client_id: str) -> Settings:
    """The same settings under another Kafka client id (a test's feeder, told apart from the service)."""
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"client_id": client_id})})
