"""One typed settings object for every postsense command, and where it is read from.

Each section is owned by the module that uses it (``KafkaSettings`` in ``connectors.kafka``, ``Limits`` in
``core.contracts``, ...); the sections of the runtime itself (batching, model, dead letters) live here.

Sources, lowest precedence first, all pydantic-settings sources: a config file (TOML, or JSON by its
``.json`` suffix), environment variables (``POSTSENSE_<SECTION>__<FIELD>``, e.g.
``POSTSENSE_KAFKA__GROUP_ID``), then CLI flags. Secrets can also come from files (``*_file`` fields) so
that a Kubernetes Secret mounted as a volume never passes through the environment or a log line.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from connectors.config import Section
from connectors.fetch import MediaSettings
from connectors.kafka import KafkaSettings
from connectors.logs import LogSettings
from connectors.metrics import MetricsSettings
from connectors.reference_queues import RedisSettings
from core.contracts import Limits

#: The config file of the settings being built (set by ``load_settings`` for ``settings_customise_sources``).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("postsense_config_file", default=None)


class SettingsError(ValueError):
    """Raised with a human-readable message listing every invalid field."""


class BatchSettings(Section):
    max_posts: int = Field(32, ge=1, le=4096)
    max_wait_ms: int = Field(200, ge=0, le=60_000)
    decode_workers: int = Field(4, ge=1, le=64)
    # Batches decoded ahead of inference; also the back-pressure threshold for pausing partitions.
    max_inflight_batches: int = Field(2, ge=1, le=32)


class ModelSettings(Section):
    checkpoint: Path | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    mixed_precision: bool = True
    # CPU inference of the image encoder: "auto" (ONNX Runtime fp32 when it is installed, for encoders that have an
    # ONNX export: faster, features within float tolerance of torch; BENCHMARKS.md), as the checkpoint says,
    # eager torch, or ONNX Runtime. GPUs always use torch.
    image_runtime: Literal["auto", "checkpoint", "torch", "onnxruntime"] = "auto"
    # The same for the text encoder.
    text_runtime: Literal["auto", "checkpoint", "torch", "onnxruntime"] = "auto"
    # CPU encoders' precision: "int8" runs both encoders through ONNX Runtime int8 models (parity on real posts
    # in BENCHMARKS.md). GPUs ignore it: the CUDA path keeps its mixed precision.
    precision: Literal["checkpoint", "fp32", "int8"] = "checkpoint"


class DeadLetterSettings(Section):
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
    limits: Limits = Field(default_factory=Limits)
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
        """Highest precedence first: CLI flags (the init kwargs), the environment, the config file."""
        path = _CONFIG_FILE.get()
        if path is None:
            return (init_settings, env_settings)
        file_source: PydanticBaseSettingsSource
        if path.suffix == ".json":
            file_source = JsonConfigSettingsSource(settings_cls, json_file=path)
        else:
            file_source = TomlConfigSettingsSource(settings_cls, toml_file=path)
        return (init_settings, env_settings, file_source)


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


def load_settings(config_file: Path | str | None = None, flags: dict[str, Any] | None = None) -> Settings:
    """Build the settings: file < environment < flags. Raises SettingsError with every problem listed."""
    path = Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise SettingsError(f"config file {path}: No such file")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**(flags or {}))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
    except (
        ValueError,
        UnicodeDecodeError,
    ) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "JSON" if path is not None and path.suffix == ".json" else "TOML"
        raise SettingsError(f"config file {path} is not valid {kind}: {exc}") from None
    finally:
        _CONFIG_FILE.reset(token)
