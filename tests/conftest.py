"""Shared fixtures: real local services (Tansu broker + redis-server) started once per test session, and the
tiny model the stream tests score with.

A test that uses the ``services`` fixture must carry the ``services`` marker (``-m "not services"`` then
runs everything that needs neither process); ``pytest_runtest_setup`` below fails one that does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from stream.local_services import Endpoints, LocalServices, free_port, unique_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:
    from core.inference import Predictor


@dataclass(frozen=True)
class Services(Endpoints):
    """The session's own broker and Redis, on free loopback ports (never the shared 6379)."""

    local: LocalServices

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
    svc = Services(f"127.0.0.1:{free_port()}", f"redis://127.0.0.1:{free_port()}/0", LocalServices(state))
    svc.start_broker()
    svc.start_redis()
    try:
        yield svc
    finally:
        svc.local.stop_all()


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read ``POSTSENSE_<SECTION>__<FIELD>`` variables: the developer's or CI's own must not change a test."""
    for name in list(os.environ):
        if name.startswith("POSTSENSE_") and "__" in name:
            monkeypatch.delenv(name)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail, before any fixture starts a process, a test that needs the real services but is not marked so."""
    if "services" in getattr(item, "fixturenames", ()) and item.get_closest_marker("services") is None:
        pytest.fail(f"{item.nodeid} uses the services fixture: mark it @pytest.mark.services", pytrace=False)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """An untrained tiny model (random weights, no downloads): enough to exercise every stream path."""
    from stream_support import LABELS

    from core.inference import Predictor
    from core.model import create_model

    return Predictor.from_model(create_model("tiny", labels=LABELS))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That tiny model saved as a checkpoint, for the tests that start ``postsense`` as a process."""
    from stream_support import LABELS

    from core.checkpoint import save_checkpoint
    from core.model import create_model

    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    save_checkpoint(create_model("tiny", labels=LABELS), path)
    return path


@pytest.fixture(scope="session")
def names() -> Callable[[str], str]:
    """``names("topic")`` → a unique name; a fixture so tests need no import from conftest."""
    return unique_name
