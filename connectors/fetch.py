"""Fetching a post's image bytes from a URL or a local path, safely.

Posts come from strangers, so a URL in a post must not become a way to reach internal services
(SSRF: loopback, RFC 1918, the 169.254.169.254 cloud metadata endpoint, ...), to hold a worker thread
for long, or to exhaust memory. Hence: the host is resolved here and *every* resolved address is
checked; the connection goes to a checked address (no second resolution, which defeats DNS
rebinding) while Host header and TLS verification use the original name; redirects are followed by
hand and re-checked at every hop; one deadline bounds the whole fetch (connect, TLS, headers, body,
all hops); the body is streamed and cut at the byte limit whatever Content-Length says.
Only the standard library is used (http.client, ssl, socket).
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urljoin, urlsplit

from pydantic import Field, field_validator

from connectors.config import Section

_SUPPORTED_SCHEMES = frozenset({"http", "https"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_USER_AGENT = "postsense-media/0.1"


@dataclass(frozen=True)
class FetchPolicy:
    """Where image bytes may come from. The byte limit is `MediaLimits.max_image_bytes`.

    allowed_hosts: None = any public host, else exact names or `*.example.com` (any subdomain,
    not the apex). allowed_networks: CIDRs reachable although not public (an internal image
    store), while every other private address stays refused; strings are accepted.
    local_root: None = `{"path": ...}` images refused, else only files that resolve (after `..`
    and symlinks) inside this directory. ca_file: a PEM bundle to trust instead of the system
    store (a private CDN with its own CA). Environment proxies are not used.
    """

    allowed_schemes: tuple[str, ...] = ("https", "http")
    allowed_hosts: tuple[str, ...] | None = None
    allow_private_addresses: bool = False
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    timeout_s: float = 3.0
    max_redirects: int = 3
    local_root: Path | None = None
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        schemes = tuple(s.lower() for s in self.allowed_schemes)
        unsupported = set(schemes) - _SUPPORTED_SCHEMES
        if unsupported:
            raise ValueError(
                f"FetchPolicy.allowed_schemes: unsupported {sorted(unsupported)}; only http, https"
            )
        object.__setattr__(self, "allowed_schemes", schemes)
        if self.allowed_hosts is not None:
            object.__setattr__(
                self, "allowed_hosts", tuple(_normalise_pattern(p) for p in self.allowed_hosts)
            )
        try:
            networks = tuple(ipaddress.ip_network(n) for n in self.allowed_networks)
        except ValueError as exc:
            raise ValueError(f"FetchPolicy.allowed_networks: {exc}") from exc
        object.__setattr__(self, "allowed_networks", networks)
        if not self.timeout_s > 0:
            raise ValueError(f"FetchPolicy.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchPolicy.max_redirects must be >= 0, got {self.max_redirects!r}")
        for name in ("local_root", "ca_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))


class MediaSettings(Section):
    """The ``media`` settings section: where image fields may be fetched from (see ``FetchPolicy``)."""

    allowed_schemes: list[Literal["http", "https"]] = ["https", "http"]  # pydantic copies list defaults
    allowed_hosts: list[str] | None = None  # None: any public host
    allow_private_addresses: bool = False
    # CIDRs exempt from the private-address refusal (an internal image store), e.g. ["10.20.0.0/16"].
    allowed_networks: list[str] = Field(default_factory=list)
    ca_file: Path | None = None  # extra CA bundle for https image hosts with a private CA
    fetch_timeout_s: float = Field(3.0, gt=0, le=60)
    max_redirects: int = Field(3, ge=0, le=10)
    local_root: Path | None = None  # None: local image paths are refused

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, networks: list[str]) -> list[str]:
        for network in networks:
            ipaddress.ip_network(network)  # a bad CIDR fails at start-up, naming the field
        return networks

    def policy(self) -> FetchPolicy:
        """The fetch policy these settings describe."""
        return FetchPolicy(
            allowed_schemes=tuple(self.allowed_schemes),
            allowed_hosts=None if self.allowed_hosts is None else tuple(self.allowed_hosts),
            allow_private_addresses=self.allow_private_addresses,
            allowed_networks=tuple(ipaddress.ip_network(n) for n in self.allowed_networks),
            timeout_s=self.fetch_timeout_s,
            max_redirects=self.max_redirects,
            local_root=self.local_root,
            ca_file=self.ca_file,
        )


class FetchError(Exception):
    """A refused or failed fetch. `reason` is the short machine string the media layer reports."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _normalise_pattern(pattern: str) -> str:
    p = pattern.strip().lower().rstrip(".")
    bare = p[2:] if p.startswith("*.") else p
    if not bare or "*" in bare:
        raise ValueError(f"FetchPolicy.allowed_hosts: bad pattern {pattern!r} (use 'host' or '*.domain')")
    return p


def host_allowed(host: str, allowed_hosts: tuple[str, ...] | None) -> bool:
    """True when `host` matches the allow-list (None = every host)."""
    if allowed_hosts is None:
        return True
    name = host.lower().rstrip(".")
    return any(name.endswith(p[1:]) if p.startswith("*.") else name == p for p in allowed_hosts)


def is_public_address(address: str) -> bool:
    """True when a post may make us connect to `address` (an IP literal, IPv6 zone id allowed).

    Refuses loopback, RFC 1918, link-local (cloud metadata), CGNAT, unspecified, multicast,
    reserved, documentation ranges, ULA/site-local IPv6, and IPv6 forms that embed such an IPv4
    address (IPv4-mapped ::ffff:a.b.c.d, 6to4 2002::/16).
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_multicast or ip.is_reserved or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return is_public_address(str(embedded))
    return True


class _DeadlineMixin:
    """Re-arms the socket timeout to what is left of one deadline before every receive.

    A plain socket timeout restarts at each recv, so a server trickling one byte at a time could hold
    the worker indefinitely; this makes the whole fetch end at `deadline` (time.monotonic()).
    """

    deadline: float

    def arm(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("fetch deadline passed")
        self.settimeout(remaining)  # type: ignore[attr-defined]

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self.arm()
        return super().recv_into(*args, **kwargs)  # type: ignore[misc]


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass


@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """One verifying context per CA bundle (loading the store is slow; wrapping is thread-safe)."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.sslsocket_class = _DeadlineSSLSocket
    return ctx


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # IDNA-encoded ASCII, as sent in Host and SNI
    port: int
    request_path: str


def _parse_target(url: str, policy: FetchPolicy) -> _Target:
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in policy.allowed_schemes:
            raise FetchError("fetch_refused_scheme", repr(parts.scheme))
        if not parts.hostname or parts.username is not None or parts.password is not None:
            raise FetchError("fetch_bad_url", "no host, or credentials in the URL")
        host = parts.hostname.encode("idna").decode("ascii")
        port = parts.port or (443 if scheme == "https" else 80)
    except (ValueError, UnicodeError) as exc:
        raise FetchError("fetch_bad_url", str(exc)) from exc
    if not host_allowed(host, policy.allowed_hosts):
        raise FetchError("fetch_refused_host", host)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(scheme, host, port, quote(path, safe="!#$%&'()*+,/:;=?@[]~"))


def _resolve(target: _Target, policy: FetchPolicy) -> list[tuple[Any, ...]]:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchError("fetch_dns_failed", target.host) from exc
    refused = [info[4][0] for info in infos if not _address_permitted(str(info[4][0]), policy)]
    if refused:  # one bad answer is enough: the attacker controls which one a retry would use
        raise FetchError("fetch_refused_private_address", f"{target.host} -> {refused[0]}")
    return infos


def _address_permitted(address: str, policy: FetchPolicy) -> bool:
    if policy.allow_private_addresses or is_public_address(address):
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return any(ip in network for network in policy.allowed_networks)


def _connect(
    target: _Target, infos: list[tuple[Any, ...]], policy: FetchPolicy, deadline: float
) -> socket.socket:
    """Connect to the first reachable *checked* address, then TLS-verify against the original name."""
    sock: _DeadlineSocket | None = None
    for family, type_, proto, _, sockaddr in infos:
        candidate = _DeadlineSocket(family, type_, proto)
        candidate.deadline = deadline
        try:
            candidate.arm()
            candidate.connect(sockaddr)
        except TimeoutError as exc:
            candidate.close()
            raise FetchError("fetch_timeout", "connect") from exc
        except OSError:
            candidate.close()
            continue
        sock = candidate
        break
    if sock is None:
        raise FetchError("fetch_connect_failed", target.host)
    if target.scheme == "http":
        return sock
    try:
        tls = _tls_context(policy.ca_file).wrap_socket(
            sock, server_hostname=target.host, do_handshake_on_connect=False
        )
        tls.deadline = deadline  # type: ignore[attr-defined]
        tls.arm()  # type: ignore[attr-defined]
        tls.do_handshake()
    except TimeoutError as exc:
        sock.close()
        raise FetchError("fetch_timeout", "TLS handshake") from exc
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise FetchError("fetch_tls_failed", str(exc)) from exc
    return tls


def _read_body(resp: http.client.HTTPResponse, max_bytes: int) -> bytes:
    declared = resp.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} > {max_bytes}")
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        chunk = resp.read(min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise FetchError("too_large", f"body exceeds {max_bytes} bytes")
    return b"".join(chunks)


def fetch_url(url: str, policy: FetchPolicy, max_bytes: int) -> bytes:
    """GET `url` under `policy`, following at most `policy.max_redirects` redirects.

    Returns the body of a 2xx answer (at most `max_bytes`); raises FetchError otherwise.
    DNS resolution itself is bounded by the system resolver's timeout, not by `timeout_s`.
    """
    deadline = time.monotonic() + policy.timeout_s
    for _hop in range(policy.max_redirects + 1):
        target = _parse_target(url, policy)
        sock = _connect(target, _resolve(target, policy), policy, deadline)
        conn_class = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(target.host, target.port)
        conn.sock = sock  # already connected to the checked address: http.client must not resolve again
        try:
            conn.request(
                "GET",
                target.request_path,
                headers={"User-Agent": _USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
            )
            resp = conn.getresponse()
            location = resp.getheader("Location")
            if resp.status in _REDIRECT_STATUSES and location:
                url = urljoin(url, location)
                continue
            if not 200 <= resp.status < 300:
                raise FetchError(f"fetch_http_{resp.status}", url)
            return _read_body(resp, max_bytes)
        except TimeoutError as exc:
            raise FetchError("fetch_timeout", url) from exc
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise FetchError("fetch_bad_response", f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
    raise FetchError("fetch_too_many_redirects", f"more than {policy.max_redirects}")


def read_local_file(path: str, policy: FetchPolicy, max_bytes: int) -> bytes:
    """Read a `{"path": ...}` image, only from inside `policy.local_root`; raises FetchError.

    Relative paths are taken from local_root. Containment is checked on the fully resolved path
    (`..` and symlinks followed) before anything is opened, so a missing file outside the root is
    reported as outside, not as missing. Only regular files are read (never a FIFO or /dev/zero).
    """
    if policy.local_root is None:
        raise FetchError("path_refused", "local paths are disabled (no local_root)")
    if "\x00" in path:
        raise FetchError("path_invalid", "NUL byte in path")
    try:
        root = policy.local_root.resolve(strict=True)
        resolved = (root / path).resolve()
    except (OSError, RuntimeError) as exc:  # root missing, symlink loop
        raise FetchError("path_invalid", str(exc)) from exc
    if not resolved.is_relative_to(root):
        raise FetchError("path_outside_root", path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError as exc:
        raise FetchError("path_not_found", path) from exc
    except OSError as exc:
        raise FetchError("path_unreadable", f"{path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError("path_not_a_file", path)
        if info.st_size > max_bytes:
            raise FetchError("too_large", f"{info.st_size} > {max_bytes} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise FetchError("path_unreadable", f"{path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FetchError("too_large", f"file grew past {max_bytes} bytes")
    return data
