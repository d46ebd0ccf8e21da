"""`postsense queues seed | inspect | snapshot | reset` against the session's real Redis and a tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import wait_until
from pydantic import SecretStr

from connectors.metrics import Metrics
from connectors.queue_store import QueueStore
from connectors.reference_queues import QueueMode, ReferenceQueues, connect
from core.checkpoint import save_checkpoint
from core.contracts import MODALITIES
from core.inference import Predictor
from core.model import create_model
from stream.commands import queues as queues_cmd
from stream.components import open_reference_queues
from stream.settings import Settings, load_settings

pytestmark = pytest.mark.services

QUEUED, L = 10, 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, np.ndarray]]:
    """A tiny checkpoint whose queues hold QUEUED of L features (a queue still warming up)."""
    torch.manual_seed(0)
    model = create_model("tiny", labels=["negative", "neutral", "positive"], queue_size=L)
    dim = model.head.config.dim
    queues = {m: torch.randn(QUEUED, dim) + i for i, m in enumerate(MODALITIES)}
    model.head.image_queue.push(queues["image"])
    model.head.text_queue.push(queues["text"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    version = save_checkpoint(model, path)
    return path, version, {m: q.numpy() for m, q in queues.items()}


@pytest.fixture
def settings(services, checkpoint, names: Callable[[str], str]) -> Settings:
    flags = {
        "redis": {"url": services.redis_url, "key_prefix": names("cli")},
        "model": {"checkpoint": str(checkpoint[0])},
    }
    return load_settings(flags=flags)


def cli(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    queues_cmd.add_arguments(parser)
    return queues_cmd.run(parser.parse_args(argv), settings)


def inspect(settings: Settings, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert cli(settings, "inspect", "--json") == 0
    return json.loads(capsys.readouterr().out)["modalities"]


def test_seed_inspect_snapshot_reset_round_trip(settings, checkpoint, capsys, tmp_path):
    _, version, ckpt = checkpoint
    store = QueueStore(connect(settings.redis), settings.redis.key_prefix, version)
    assert cli(settings, "seed") == 0
    state = store.read(contents=True)
    for m in MODALITIES:
        np.testing.assert_array_equal(state[m].features, ckpt[m])
    capsys.readouterr()
    assert cli(settings, "seed") == 0  # idempotent: a deploy's init job may run it on every rollout
    assert "already exist" in capsys.readouterr().out
    np.testing.assert_array_equal(store.read(contents=True)["text"].features, ckpt["text"])

    seeded = inspect(settings, capsys)
    for m in MODALITIES:
        rows = ckpt[m].astype(np.float64)
        sigma = np.sqrt(((rows - rows.mean(0)) ** 2).sum(1).mean())
        assert (seeded[m]["length"], seeded[m]["capacity"]) == (QUEUED, L)
        assert seeded[m]["sigma"] == pytest.approx(sigma, rel=1e-5)
        assert seeded[m]["drift_sigmas"] == 0 and not seeded[m]["changed_since_checkpoint"]

    with ReferenceQueues(settings.redis, version) as worker:  # the stream moves the queues
        live = {m: np.full((3, state[m].dim), 4.0, dtype=np.float32) for m in MODALITIES}
        worker.propose(live, {m: np.ones(3, bool) for m in MODALITIES})
    moved = inspect(settings, capsys)
    assert all(moved[m]["drift_sigmas"] > 0 and moved[m]["changed_since_checkpoint"] for m in MODALITIES)
    assert moved["image"]["length"] == QUEUED + 3 and not moved["image"]["stored_stats_current"]

    assert cli(settings, "snapshot", "--out", str(tmp_path / "queues.snap")) == 0
    assert cli(settings, "reset") == 0
    for m in MODALITIES:
        np.testing.assert_array_equal(store.read(contents=True)[m].features, ckpt[m])
    assert inspect(settings, capsys)["text"]["drift_sigmas"] == 0

    assert cli(settings, "seed", "--snapshot", str(tmp_path / "queues.snap"), "--overwrite") == 0
    restored = store.read(contents=True)
    for m in MODALITIES:
        np.testing.assert_array_equal(restored[m].features, np.concatenate([ckpt[m], live[m]]))
    assert inspect(settings, capsys)["image"]["drift_sigmas"] == pytest.approx(moved["image"]["drift_sigmas"])
    assert cli(settings, "reset") == 0  # the snapshot carried the checkpoint reference too
    np.testing.assert_array_equal(store.read(contents=True)["image"].features, ckpt["image"])


def test_operator_mistakes_are_clear_errors(settings, checkpoint, capsys, tmp_path):
    _, version, _ = checkpoint
    assert cli(settings, "inspect") == 1
    assert "queues seed` first" in capsys.readouterr().err
    assert cli(settings, "reset") == 1
    assert "seed them first" in capsys.readouterr().err
    assert cli(settings, "snapshot") == 1
    assert "--out" in capsys.readouterr().err

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a snapshot")
    assert cli(settings, "seed", "--snapshot", str(junk)) == 1
    assert "cannot read snapshot" in capsys.readouterr().err

    assert cli(settings, "seed") == 0
    assert cli(settings, "snapshot", "--out", str(tmp_path / "s.npz")) == 0
    assert cli(settings, "seed", "--snapshot", str(tmp_path / "s.npz"), "--model-version", "other") == 1
    assert f"model version {version}, not other" in capsys.readouterr().err

    no_checkpoint = settings.model_copy(
        update={"model": settings.model.model_copy(update={"checkpoint": None})}
    )
    assert cli(no_checkpoint, "inspect") == 1
    assert "--model-version" in capsys.readouterr().err
    assert cli(no_checkpoint, "inspect", "--model-version", version) == 0

    unreachable = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": SecretStr("redis://127.0.0.1:1/0")})}
    )
    assert cli(unreachable, "inspect", "--model-version", version) == 1
    assert "Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err


# --- the "no reference queues" warning ------------------------------------------------------------------------------

UNSEEDED = "no reference queues under"


def unseeded_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(UNSEEDED)]


def test_serve_seeding_empty_queues_itself_does_not_warn_that_they_are_missing(settings, caplog):
    caplog.set_level(logging.INFO, logger="connectors.reference_queues")
    predictor = Predictor.from_checkpoint(settings.model.checkpoint, "cpu")
    queues = open_reference_queues(
        settings, predictor, Metrics()
    )  # what `serve` does at start, on an empty Redis
    try:
        assert queues.stats() is not None  # seeded from the checkpoint by the worker itself
        assert queues.refresh()
    finally:
        queues.close()
    assert unseeded_warnings(caplog) == []


def test_queues_that_stay_unseeded_are_reported_once(settings, caplog):
    caplog.set_level(logging.INFO, logger="connectors.reference_queues")
    version = Predictor.from_checkpoint(settings.model.checkpoint, "cpu").model_version
    frozen = settings.redis.model_copy(update={"mode": QueueMode.FROZEN})
    with ReferenceQueues(frozen, version) as worker:  # a frozen worker never seeds: it says so at once
        assert len(unseeded_warnings(caplog)) == 1
        assert worker.refresh() and worker.refresh()
    [message] = unseeded_warnings(caplog)
    assert settings.redis.key_prefix in message and "`postsense queues seed`" in message

    caplog.clear()
    online = settings.redis.model_copy(update={"refresh_interval_s": 0.1})
    with ReferenceQueues(online, version):  # online, but nobody seeds: said at its first background refresh
        assert wait_until(lambda: unseeded_warnings(caplog), 10)
        time.sleep(0.5)  # several more refreshes
    assert len(unseeded_warnings(caplog)) == 1
