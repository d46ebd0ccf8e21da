"""Image sources that reach outside the post: URLs (SSRF, redirects, time and byte budgets, TLS) and
local paths (containment in local_root).

URL tests talk to real http.server instances on 127.0.0.1, which the default policy must refuse,
so every test that expects a fetch to succeed opts in explicitly.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from connectors.fetch import FetchError, fetch_url, host_allowed, is_public_address
from connectors.media import FetchPolicy, MediaLimits, decode_image_field
from core.contracts import ModalityState

LIMITS = MediaLimits()
OPTED_IN = FetchPolicy(allow_private_addresses=True, timeout_s=2.0)
ONLY_LOOPBACK_V4 = FetchPolicy(allowed_networks=("127.0.0.1/32",), timeout_s=2.0)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, "PNG")
    return buf.getvalue()


PNG = _png((20, 160, 90))


class Handler(BaseHTTPRequestHandler):
    """Routes for every behaviour a hostile or broken image server can show."""

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, chunk: bytes, count: int, pause_s: float) -> None:
        self.send_response(200)
        self.end_headers()  # no Content-Length: the body ends when the connection closes
        try:
            for _ in range(count):
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(pause_s)  # the slow server under test, not a wait
        except OSError:  # the client gave up, as it should
            pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif url.path == "/host":
            self._send(200, self.headers["Host"].encode())
        elif url.path == "/redirect":
            self._send(302, headers={"Location": parse_qs(url.query)["to"][0]})
        elif url.path.startswith("/chain/"):
            left = int(url.path.rsplit("/", 1)[1])
            if left:
                self._send(302, headers={"Location": f"/chain/{left - 1}"})
            else:
                self._send(200, PNG)
        elif url.path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif url.path == "/sleep":
            time.sleep(3)  # a server slower than the fetch timeout: the behaviour under test
            self._send(200, PNG)
        elif url.path == "/trickle":  # a byte every 50 ms: no single read ever times out
            self._stream(b"x", 60, 0.05)
        elif url.path == "/huge":
            self._stream(b"\0" * 65536, 64, 0)
        elif url.path == "/huge-declared":
            self._send(200, b"\0" * 1000, {"Content-Length": str(10**9)})
        else:
            self._send(404, b"not here")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # refused TLS handshakes
        pass


def _serve(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    yield from _serve(QuietServer(("127.0.0.1", 0), Handler))


def field_url(
    url: str, policy: FetchPolicy, limits: MediaLimits = LIMITS
) -> tuple[ModalityState, str | None]:
    result = decode_image_field({"url": url}, limits, policy)
    return result.state, result.reason


def refused(reason: str) -> tuple[ModalityState, str]:
    return ModalityState.undecodable, reason


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, list[list[str]]]], list[str]]:
    """Install a resolver whose answers per name change from query to query (DNS rebinding).

    Names not in the table resolve for real. Returns the list of names queried.
    """

    def install(answers: dict[str, list[list[str]]]) -> list[str]:
        queried: list[str] = []
        real = socket.getaddrinfo

        def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
            if host not in answers:
                return real(host, port, *args, **kwargs)
            queried.append(host)
            ips = answers[host][min(len(queried), len(answers[host])) - 1]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        return queried

    return install


# --- address and host rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # CGNAT
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1%eth0",
        "fec0::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "2002:808:808::"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(address)


def test_host_allow_list_wildcards() -> None:
    allowed = FetchPolicy(allowed_hosts=("*.cdn.example.com", "Images.Example.org.")).allowed_hosts
    assert host_allowed("a.cdn.example.com", allowed)
    assert host_allowed("x.y.cdn.example.com", allowed)
    assert host_allowed("images.example.org", allowed)
    assert not host_allowed("cdn.example.com", allowed)  # the wildcard is subdomains only
    assert not host_allowed("evilcdn.example.com", allowed)
    assert not host_allowed("images.example.org.evil.net", allowed)
    assert host_allowed("anything.net", None)


def test_bad_policies_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="allowed_schemes"):
        FetchPolicy(allowed_schemes=("https", "file"))
    with pytest.raises(ValueError, match="allowed_hosts"):
        FetchPolicy(allowed_hosts=("*",))
    with pytest.raises(ValueError, match="allowed_networks"):
        FetchPolicy(allowed_networks=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="timeout_s"):
        FetchPolicy(timeout_s=0)


# --- URLs ---------------------------------------------------------------------------------------


def test_fetch_when_private_addresses_are_opted_in(port: int) -> None:
    result = decode_image_field({"url": f"http://127.0.0.1:{port}/img.png"}, LIMITS, OPTED_IN)
    assert result.state is ModalityState.ok and result.image is not None
    assert result.image.getpixel((2, 2)) == (20, 160, 90)
    assert result.nbytes == len(PNG)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"],
)
def test_loopback_is_refused_by_default(port: int, host: str) -> None:
    assert field_url(f"http://{host}:{port}/img.png", FetchPolicy()) == refused(
        "fetch_refused_private_address"
    )


def test_allowed_network_admits_only_itself(port: int) -> None:
    assert field_url(f"http://127.0.0.1:{port}/img.png", ONLY_LOOPBACK_V4)[0] is ModalityState.ok
    assert field_url(f"http://127.0.0.2:{port}/img.png", ONLY_LOOPBACK_V4) == refused(
        "fetch_refused_private_address"
    )


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "fetch_refused_private_address"),
        ("http://10.0.0.1/", "fetch_refused_private_address"),
        ("http://[::1]/", "fetch_refused_private_address"),
        ("file:///etc/passwd", "fetch_refused_scheme"),
        ("gopher://127.0.0.1:6379/_INFO", "fetch_refused_scheme"),
    ],
)
def test_every_redirect_hop_is_checked(port: int, target: str, reason: str) -> None:
    assert field_url(f"http://127.0.0.1:{port}/redirect?to={target}", ONLY_LOOPBACK_V4) == refused(reason)


def test_redirects_are_followed_up_to_the_limit(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    assert field_url(f"{base}/redirect?to={base}/img.png", OPTED_IN)[0] is ModalityState.ok
    assert field_url(f"{base}/chain/3", OPTED_IN)[0] is ModalityState.ok  # relative Locations, 3 hops
    assert field_url(f"{base}/chain/4", OPTED_IN) == refused("fetch_too_many_redirects")
    assert field_url(f"{base}/loop", OPTED_IN) == refused("fetch_too_many_redirects")
    no_redirects = FetchPolicy(allow_private_addresses=True, max_redirects=0)
    assert field_url(f"{base}/chain/1", no_redirects) == refused("fetch_too_many_redirects")


def test_redirect_to_a_host_off_the_allow_list_is_refused(port: int) -> None:
    policy = FetchPolicy(allow_private_addresses=True, allowed_hosts=("127.0.0.1",))
    url = f"http://127.0.0.1:{port}/redirect?to=http://localhost:{port}/img.png"
    assert field_url(url, policy) == refused("fetch_refused_host")


@pytest.mark.parametrize("path", ["/sleep", "/trickle"])
def test_whole_fetch_has_one_deadline(port: int, path: str) -> None:
    started = time.monotonic()
    policy = FetchPolicy(allow_private_addresses=True, timeout_s=0.5)
    assert field_url(f"http://127.0.0.1:{port}{path}", policy) == refused("fetch_timeout")
    assert time.monotonic() - started < 2.5  # the server would hold us 3 s


@pytest.mark.parametrize("path", ["/huge", "/huge-declared"])
def test_body_is_cut_at_the_byte_limit(port: int, path: str) -> None:
    small = MediaLimits(max_image_bytes=100_000)
    assert field_url(f"http://127.0.0.1:{port}{path}", OPTED_IN, small) == refused("too_large")


def test_http_errors_are_reported(port: int) -> None:
    assert field_url(f"http://127.0.0.1:{port}/nope.png", OPTED_IN) == refused("fetch_http_404")


@pytest.mark.parametrize(
    "url", ["http://", "http://user:pw@127.0.0.1/img.png", "http://[::1/img.png", "http://h.example:99999/"]
)
def test_malformed_urls(url: str) -> None:
    assert field_url(url, OPTED_IN) == refused("fetch_bad_url")


def test_connection_refused(port: int) -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert field_url(f"http://127.0.0.1:{free}/img.png", OPTED_IN) == refused("fetch_connect_failed")


def test_connects_to_the_checked_address_and_sends_the_original_host(port: int, fake_dns: Any) -> None:
    # First answer is allowed; any later query would point at the metadata service (DNS rebinding).
    queried = fake_dns({"images.test": [["127.0.0.1"], ["169.254.169.254"]]})
    body = fetch_url(f"http://images.test:{port}/host", ONLY_LOOPBACK_V4, max_bytes=1000)
    assert body == f"images.test:{port}".encode()
    assert queried == ["images.test"]


def test_one_refused_answer_refuses_the_name(port: int, fake_dns: Any) -> None:
    fake_dns({"mixed.test": [["8.8.8.8", "127.0.0.1"]]})
    assert field_url(f"http://mixed.test:{port}/img.png", FetchPolicy()) == refused(
        "fetch_refused_private_address"
    )


def test_fetch_error_carries_reason() -> None:
    with pytest.raises(FetchError) as info:
        fetch_url("ftp://example.com/a.png", FetchPolicy(), max_bytes=10)
    assert info.value.reason == "fetch_refused_scheme"


# --- HTTPS --------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=postsense test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "leaf.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext", cwd=d)  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tls_port(tls_files: Path) -> Iterator[int]:
    server = QuietServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_files / "leaf.pem", tls_files / "leaf.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    yield from _serve(server)


def test_https_verifies_against_the_hostname(tls_files: Path, tls_port: int, fake_dns: Any) -> None:
    trusting = FetchPolicy(allow_private_addresses=True, ca_file=tls_files / "ca.pem")
    assert field_url(f"https://127.0.0.1:{tls_port}/img.png", trusting)[0] is ModalityState.ok
    # Same server, same address, but the URL names a host the certificate does not cover.
    fake_dns({"other.test": [["127.0.0.1"]]})
    assert field_url(f"https://other.test:{tls_port}/img.png", trusting) == refused("fetch_tls_failed")


def test_https_refuses_an_untrusted_certificate(tls_port: int) -> None:
    assert field_url(f"https://127.0.0.1:{tls_port}/img.png", OPTED_IN) == refused("fetch_tls_failed")


# --- local paths --------------------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(_png((255, 0, 0)))
    return root


def field_path(
    path: str | Path, root: Path | None, limits: MediaLimits = LIMITS
) -> tuple[ModalityState, str | None]:
    result = decode_image_field({"path": str(path)}, limits, FetchPolicy(local_root=root))
    return result.state, result.reason


def test_paths_inside_the_root_are_read(media_root: Path) -> None:
    assert field_path("sub/ok.png", media_root)[0] is ModalityState.ok
    assert field_path(media_root / "sub" / "ok.png", media_root)[0] is ModalityState.ok
    assert field_path("sub/../sub/./ok.png", media_root)[0] is ModalityState.ok
    os.symlink(media_root / "sub" / "ok.png", media_root / "alias.png")
    assert field_path("alias.png", media_root)[0] is ModalityState.ok


def test_paths_escaping_the_root_are_refused(media_root: Path) -> None:
    escape = refused("path_outside_root")
    assert field_path("../secret.png", media_root) == escape
    assert field_path("sub/../../secret.png", media_root) == escape
    assert field_path(media_root.parent / "secret.png", media_root) == escape
    assert field_path("../no-such-file.png", media_root) == escape  # existence outside is not revealed
    os.symlink(media_root.parent / "secret.png", media_root / "link.png")
    assert field_path("link.png", media_root) == escape
    os.symlink(media_root.parent, media_root / "up")
    assert field_path("up/secret.png", media_root) == escape


def test_local_path_failures(media_root: Path) -> None:
    assert field_path("sub/ok.png", None) == refused("path_refused")
    assert field_path("sub/missing.png", media_root) == refused("path_not_found")
    assert field_path("sub", media_root) == refused("path_not_a_file")
    os.mkfifo(media_root / "pipe")  # opening a FIFO for reading would block forever
    assert field_path("pipe", media_root) == refused("path_not_a_file")
    assert field_path("sub/ok.png", media_root, MediaLimits(max_image_bytes=10)) == refused("too_large")
    assert field_path("sub/\x00.png", media_root) == refused("path_invalid")


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(PNG)
    (root / "junk.bin").write_bytes(b"\x89PNG junk")
    return root


@settings(max_examples=200, deadline=None)
@given(
    path=st.text(max_size=30)
    | st.sampled_from(["ok.png", "junk.bin", ".", "..", "/", "/dev/zero", "/proc/self/mem"])
)
def test_arbitrary_paths_never_raise(fuzz_root: Path, path: str) -> None:
    result = decode_image_field({"path": path}, LIMITS, FetchPolicy(local_root=fuzz_root))
    assert result.state in (ModalityState.ok, ModalityState.empty, ModalityState.undecodable)
    assert (result.image is not None) == (result.state is ModalityState.ok)


# Hosts off the allow-list are refused before any DNS query, so fuzzing needs no network.
@settings(max_examples=300, deadline=None)
@given(
    url=st.text(max_size=40)
    | st.builds("{}://{}".format, st.sampled_from(["http", "https", "HTTP"]), st.text(max_size=40))
)
def test_arbitrary_urls_never_raise(url: str) -> None:
    result = decode_image_field({"url": url}, LIMITS, FetchPolicy(allowed_hosts=("images.invalid",)))
    assert result.state in (ModalityState.empty, ModalityState.undecodable)
    assert result.state is ModalityState.empty or result.reason.startswith("fetch_")


def test_url_and_base64_give_the_same_pixels(port: int) -> None:
    via_url = decode_image_field({"url": f"http://127.0.0.1:{port}/img.png"}, LIMITS, OPTED_IN)
    via_b64 = decode_image_field({"base64": base64.b64encode(PNG).decode()}, LIMITS, FetchPolicy())
    assert via_url.image is not None and via_b64.image is not None
    assert via_url.image.tobytes() == via_b64.image.tobytes()
