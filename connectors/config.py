"""What every connector's settings section shares: strict fields, secrets read from files, redacted URLs.

Each connector owns the settings section of what it configures (``KafkaSettings`` in ``connectors.kafka``,
``RedisSettings`` in ``connectors.reference_queues``, ...); ``stream.settings`` only composes the sections
into one object and loads it from its sources. So a connector never imports the layer above it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, SecretStr


class Section(BaseModel):
    """A settings section: unknown fields are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_secret_file(path: Path | None) -> SecretStr | None:
    """The secret in ``path`` (a mounted Kubernetes Secret), stripped; None without a path."""
    if path is None:
        return None
    try:
        return SecretStr(Path(path).read_text().strip())
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and metrics)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
