"""One typed settings object for every postsense command.

Sources, lowest precedence first: a config file (TOML or JSON), environment variables
(``POSTSENSE_<SECTION>__<FIELD>``, e.g. ``POSTSENSE_KAFKA__GROUP_ID``), then CLI flags.
Secrets can also come from files (``..._FILE`` variables or ``*_file`` fields) so that a
Kubernetes Secret mounted as a volume never passes through the environment or a log line.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import tomllib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class SettingsError(ValueError):
    """Raised with a human-readable message listing every invalid field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _read_secret_file(path: Path | None) -> SecretStr | None:
    if path is None:
        return None
    try:
        return SecretStr(Path(path).read_text().strip())
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None


class SecurityProtocol(str, Enum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class KafkaSettings(_Section):
    bootstrap_servers: list[str] = Field(default_factory=lambda: ["127.0.0.1:9092"], min_length=1)
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    ssl_password_file: Path | None = None
    ssl_check_hostname: bool = True

    group_id: str = "postsense"
    # Static membership (KIP-345): a stable id per pod lets a restart rejoin without a rebalance.
    group_instance_id: str | None = None
    client_id: str = "postsense"
    input_topic: str = "posts"
    output_topic: str = "sentiment"
    dead_letter_topic: str = "posts.dlq"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"

    # Tansu (and small clusters) take about half the session timeout to finish a join, so both
    # are exposed; heartbeat must stay well under session.
    session_timeout_ms: int = Field(10_000, ge=1_000, le=300_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    request_timeout_ms: int = Field(30_000, ge=1_000)
    fetch_max_bytes: int = Field(52_428_800, ge=1024)
    max_partition_fetch_bytes: int = Field(10_485_760, ge=1024)
    producer_linger_ms: int = Field(5, ge=0)
    producer_batch_size: int = Field(262_144, ge=1024)
    producer_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"
    # How long to wait for every send of a batch to be acknowledged before the batch counts as unpublished.
    produce_timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be lower than "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        if self.sasl_password is None and self.sasl_password_file is not None:
            self.sasl_password = _read_secret_file(self.sasl_password_file)
        if self.ssl_password is None and self.ssl_password_file is not None:
            self.ssl_password = _read_secret_file(self.ssl_password_file)
        proto = self.security_protocol
        if proto in (SecurityProtocol.SASL_SSL, SecurityProtocol.SASL_PLAINTEXT):
            missing = [
                name
                for name, value in (
                    ("sasl_mechanism", self.sasl_mechanism),
                    ("sasl_username", self.sasl_username),
                    ("sasl_password", self.sasl_password),
                )
                if value is None
            ]
            if missing:
                raise ValueError(f"security_protocol {proto.value} needs {', '.join(missing)}")
        elif self.sasl_mechanism is not None:
            raise ValueError(f"sasl_mechanism is set but security_protocol is {proto.value}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (client certificate)")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        return self


class BatchSettings(_Section):
    max_posts: int = Field(32, ge=1, le=4096)
    max_wait_ms: int = Field(200, ge=0, le=60_000)
    decode_workers: int = Field(4, ge=1, le=64)
    # Batches decoded ahead of inference; also the back-pressure threshold for pausing partitions.
    max_inflight_batches: int = Field(2, ge=1, le=32)


class ModelSettings(_Section):
    checkpoint: Path | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    mixed_precision: bool = True
    # CPU inference of the image encoder: as the checkpoint says, eager torch, or ONNX Runtime (1.5-3.4x here,
    # BENCHMARKS.md; needs the `onnx` extra). GPUs always use torch.
    image_runtime: Literal["checkpoint", "torch", "onnxruntime"] = "checkpoint"
    # The same for the text encoder (ONNX Runtime: features within ~1e-6 of torch).
    text_runtime: Literal["checkpoint", "torch", "onnxruntime"] = "checkpoint"
    # CPU encoders' precision: "int8" runs both encoders through ONNX Runtime int8 models (parity on real posts
    # in BENCHMARKS.md). GPUs ignore it: the CUDA path keeps its mixed precision.
    precision: Literal["checkpoint", "fp32", "int8"] = "checkpoint"


class QueueMode(str, Enum):
    FROZEN = "frozen"
    ONLINE = "online"


class RedisSettings(_Section):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    url_file: Path | None = None
    key_prefix: str = Field("postsense", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    mode: QueueMode = QueueMode.ONLINE
    refresh_interval_s: float = Field(5.0, gt=0)
    # Guard rail against queue poisoning: at most this many accepted features per modality per interval.
    max_accepted_per_interval: int = Field(256, ge=0)
    accept_interval_s: float = Field(60.0, gt=0)
    # Every Redis call on the hot path is bounded by this; the consumer never waits longer.
    op_timeout_s: float = Field(0.5, gt=0, le=30)
    reconnect_backoff_max_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _url_from_file(self) -> RedisSettings:
        if self.url_file is not None:
            secret = _read_secret_file(self.url_file)
            assert secret is not None
            object.__setattr__(self, "url", secret)
        scheme = urlsplit(self.url.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix:// (got {scheme or 'none'}://)")
        return self

    def redacted_url(self) -> str:
        return redact_url(self.url.get_secret_value())


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9400, ge=0, le=65535)  # 0 = pick a free port (tests)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_logs: bool = Field(False, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LimitSettings(_Section):
    """Bounds on untrusted input; anything past them is a dead letter or a modality state, never an OOM."""

    max_record_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_text_chars: int = Field(10_000, ge=1)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    max_metadata_depth: int = Field(16, ge=1)
    max_metadata_bytes: int = Field(64 * 1024, ge=0)


class MediaSettings(_Section):
    allowed_schemes: list[Literal["http", "https"]] = Field(default_factory=lambda: ["https", "http"])
    allowed_hosts: list[str] | None = None  # None: any public host
    allow_private_addresses: bool = False
    # CIDRs exempt from the private-address refusal (an internal image store), e.g. ["10.20.0.0/16"].
    allowed_networks: list[str] = Field(default_factory=list)
    ca_file: Path | None = None  # extra CA bundle for https image hosts with a private CA
    fetch_timeout_s: float = Field(3.0, gt=0, le=60)
    max_redirects: int = Field(3, ge=0, le=10)
    local_root: Path | None = None  # None: local image paths are refused


class DeadLetterSettings(_Section):
    """Circuit breaker: stop rather than dead-letter a whole topic when the input is clearly wrong."""

    max_invalid_ratio: float = Field(0.5, gt=0, le=1)
    window: int = Field(1000, ge=1)
    min_window: int = Field(100, ge=1)
    max_consecutive_invalid: int = Field(500, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="POSTSENSE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    dead_letter: DeadLetterSettings = Field(default_factory=DeadLetterSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the CLI flags merged over the file (see load_settings): env beats the file
        # because load_settings only passes file values the environment does not set.
        return (init_settings, env_settings)


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


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into nested dicts."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror}") from None
    try:
        if str(path).endswith(".json"):
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid {'JSON' if str(path).endswith('.json') else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a table/object at the top level")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_keys(environ: dict[str, str]) -> set[tuple[str, str]]:
    """(section, field) pairs the environment sets, so file values never override them."""
    keys = set()
    for name in environ:
        if name.upper().startswith("POSTSENSE_") and "__" in name:
            section, _, field = name[len("POSTSENSE_") :].lower().partition("__")
            keys.add((section, field))
    return keys


def _drop_env_set(file_data: dict[str, Any], env_keys: set[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, fields in file_data.items():
        if isinstance(fields, dict):
            out[section] = {k: v for k, v in fields.items() if (section, k.lower()) not in env_keys}
        else:
            out[section] = fields
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``section.field=value`` (a CLI ``--set``) → nested dict; the value is parsed as JSON when it can be."""
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise SettingsError(f"--set expects section.field=value, got {item!r}")
    section, field = key.split(".", 1)
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return {section: {field: parsed}}


def load_settings(
    config_file: Path | str | None = None,
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the settings: file < environment < flags. Raises SettingsError with every problem listed."""
    import os

    env = dict(os.environ if environ is None else environ)
    file_data = read_config_file(Path(config_file)) if config_file else {}
    merged = _deep_merge(_drop_env_set(file_data, _env_keys(env)), flags or {})
    try:
        if environ is None:
            return Settings(**merged)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            return Settings(**merged)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
