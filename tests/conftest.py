"""Shared fixtures: real local services (Tansu broker + redis-server) started once per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connectors.services import LocalServices, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def unique_name(prefix: str = "t") -> str:
    """A fresh topic / group / key-prefix name, so tests never share state (Tansu groups can lock up)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Services:
    """The session's own broker and Redis, on free loopback ports (never the shared 6379)."""

    local: LocalServices
    broker_port: int
    redis_port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_broker(self) -> None:
        self.local.ensure_broker(self.bootstrap)

    def stop_broker(self) -> None:
        self.local.stop("broker")

    def start_redis(self) -> None:
        self.local.ensure_redis(self.redis_url)

    def stop_redis(self) -> None:
        self.local.stop("redis")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    state = Path(tmp_path_factory.mktemp("services"))
    svc = Services(LocalServices(state), free_port(), free_port())
    svc.start_broker()
    svc.start_redis()
    try:
        yield svc
    finally:
        svc.local.stop_all()


@pytest.fixture
def names() -> type:
    """``names("topic")`` → a unique name; a fixture so tests need no import from conftest."""
    return unique_name  # type: ignore[return-value]
