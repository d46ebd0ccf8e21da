"""The ``kafka`` settings section, kafka-python clients configured from it, and the admin helpers the service and tests need.

Every client (consumer, producer, admin) gets the same connection and security block, so TLS and SASL
are configured once. The producer is idempotent with ``acks=all``, both set explicitly: kafka-python 3.x
defaults to that already, but 2.x did not, and the service's at-least-once guarantee depends on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from pydantic import Field, SecretStr, model_validator

from connectors.config import Section, read_secret_file
from core.contracts import Limits


class SecurityProtocol(str, Enum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class KafkaSettings(Section):
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
            self.sasl_password = read_secret_file(self.sasl_password_file)
        if self.ssl_password is None and self.ssl_password_file is not None:
            self.ssl_password = read_secret_file(self.ssl_password_file)
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


#: Errors after which an idempotent producer never recovers (its producer id or sequence numbers are no
#: longer known to the broker, e.g. after a broker restart); the only cure is a new producer.
PRODUCER_FATAL_ERRORS: tuple[type[Exception], ...] = (
    kafka_errors.UnknownProducerIdError,
    kafka_errors.OutOfOrderSequenceNumberError,
    kafka_errors.InvalidProducerEpochError,
    kafka_errors.InvalidProducerIdMappingError,
    kafka_errors.ProducerFencedError,
    kafka_errors.IllegalStateError,
)


class _RedactPasswords(logging.Filter):
    """kafka-python's admin client logs its whole configuration at DEBUG, SASL and SSL passwords included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = {
                k: "***" if "password" in str(k) and v is not None else v for k, v in record.args.items()
            }
        return True


logging.getLogger("kafka.admin.client").addFilter(_RedactPasswords())

#: Headroom over the largest accepted input record, so a dead letter (original bytes + reason headers) fits.
_DEAD_LETTER_HEADROOM_BYTES = 64 * 1024


def connection_config(kafka: KafkaSettings) -> dict[str, Any]:
    """Bootstrap servers, client id, TLS and SASL: the block shared by every client."""
    config: dict[str, Any] = {
        "bootstrap_servers": list(kafka.bootstrap_servers),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol.value,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    if kafka.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL):
        config["ssl_check_hostname"] = kafka.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(kafka, name)
            if path is not None:
                config[name] = str(path)
        if kafka.ssl_password is not None:
            config["ssl_password"] = kafka.ssl_password.get_secret_value()
    if kafka.security_protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL):
        assert kafka.sasl_password is not None  # guaranteed by KafkaSettings' validator
        config["sasl_mechanism"] = kafka.sasl_mechanism
        config["sasl_plain_username"] = kafka.sasl_username
        config["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return config


def consumer_config(kafka: KafkaSettings, max_posts: int) -> dict[str, Any]:
    """A group consumer that never commits on its own: the service commits explicit offsets per batch."""
    config = connection_config(kafka)
    config.update(
        group_id=kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset=kafka.auto_offset_reset,
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        max_poll_records=max_posts,
        fetch_max_bytes=kafka.fetch_max_bytes,
        max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
    )
    if kafka.group_instance_id:
        config["group_instance_id"] = kafka.group_instance_id
    return config


def producer_config(kafka: KafkaSettings, limits: Limits) -> dict[str, Any]:
    """Idempotent, acks=all, and every send resolves (acknowledged or failed) within produce_timeout_s."""
    config = connection_config(kafka)
    linger = kafka.producer_linger_ms
    config.update(
        acks="all",
        enable_idempotence=True,
        linger_ms=linger,
        batch_size=kafka.producer_batch_size,
        compression_type=None if kafka.producer_compression == "none" else kafka.producer_compression,
        max_request_size=limits.max_record_bytes + _DEAD_LETTER_HEADROOM_BYTES,
        # kafka-python requires delivery >= linger + request timeout; past it a send fails instead of hanging.
        delivery_timeout_ms=max(int(kafka.produce_timeout_s * 1000), kafka.request_timeout_ms + linger),
        max_block_ms=int(kafka.produce_timeout_s * 1000),
    )
    return config


def make_consumer(kafka: KafkaSettings, max_posts: int) -> KafkaConsumer:
    """A consumer not yet subscribed (the caller subscribes with its rebalance listener)."""
    return KafkaConsumer(**consumer_config(kafka, max_posts))


def make_producer(kafka: KafkaSettings, limits: Limits) -> KafkaProducer:
    return KafkaProducer(**producer_config(kafka, limits))


def make_admin(kafka: KafkaSettings) -> KafkaAdminClient:
    return KafkaAdminClient(**connection_config(kafka))


def ensure_topics(
    kafka: KafkaSettings,
    topics: Iterable[str],
    partitions: int = 6,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet with ``partitions`` partitions; returns the ones created.

    Topics that already exist are left as they are (their partition count is not changed). Retries until
    the broker answers or ``timeout_s`` passes, because a broker that was just started may refuse the
    first connection.
    """
    names = sorted(set(topics))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = make_admin(kafka)
            break
        except kafka_errors.KafkaTimeoutError:
            # kafka-python 3 has no NoBrokersAvailable: bootstrap times out.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            admin.create_topics(
                {
                    name: {"num_partitions": partitions, "replication_factor": replication_factor}
                    for name in missing
                },
                raise_errors=False,
            )
        _wait_for_topics(admin, names, deadline)
        return missing
    finally:
        admin.close()


def _wait_for_topics(admin: KafkaAdminClient, names: list[str], deadline: float) -> None:
    while True:
        existing = set(admin.list_topics())
        absent = [name for name in names if name not in existing]
        if not absent:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not created in time: {', '.join(absent)}")
        time.sleep(0.2)
