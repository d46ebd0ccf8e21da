"""The HTTP server of a worker's ``/metrics``, ``/healthz`` and ``/readyz``, on a daemon thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from connectors.metrics import Metrics

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server.metrics.exposition(self.headers.get("Accept"))
            self._reply(200, body, content_type)
        elif path == "/healthz":
            self._probe(self.server.alive, "alive", "not alive")
        elif path == "/readyz":
            self._probe(self.server.ready, "ready", "not ready")
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _probe(self, check: Callable[[], bool], ok: str, not_ok: str) -> None:
        # A probe callback that raises must not kill the server thread: report it as failing.
        try:
            good = bool(check())
            why = ""
        except Exception as exc:  # any failure of the check means "not ok"
            good, why = False, f": {type(exc).__name__}: {exc}"
        self._reply(200 if good else 503, f"{ok if good else not_ok + why}\n".encode())

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # One line per scrape or probe would drown the service's own log.
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: Metrics, ready: Callable[[], bool], alive: Callable[[], bool]
    ) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.ready = ready
        self.alive = alive


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` (alive) and ``/readyz`` (``ready()``: model loaded, partitions assigned).

    Runs in a daemon thread so that a slow scrape never delays the consumer loop. ``port=0`` picks a
    free port (read it back from ``.port``). ``alive`` defaults to "the process answers"; the runtime
    can pass a check of its own loop (e.g. it polled recently) so that Kubernetes restarts a stuck pod.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str = "0.0.0.0",
        port: int = 9400,
        ready: Callable[[], bool] = lambda: True,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        try:
            self._server = _Server((host, port), metrics, ready, alive)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port: int = self._server.server_address[1]
        # A short poll interval makes close() return within ~0.1 s (shutdown waits for the next poll).
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
