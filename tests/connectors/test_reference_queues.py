"""Redis reference queues against real redis-server processes of the test's own (never the shared one)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import sample_value, wait_until

from connectors.metrics import Metrics
from connectors.queue_store import QueueStore, ReferenceQueueError
from connectors.reference_queues import RedisSettings, ReferenceQueues, connect
from core.contracts import MODALITIES
from stream.local_services import LocalServices, free_port, redis_binary

pytestmark = pytest.mark.services

DIM, L = 8, 12
REPO = Path(__file__).resolve().parents[2]


class PrivateRedis:
    """A redis-server of this test module that can be stopped, restarted and paused."""

    def __init__(self, state: Path, password: str | None = None) -> None:
        self.local = LocalServices(state)
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{free_port()}/0"
        self.pid = 0
        self.start()

    def start(self) -> None:
        endpoint = self.local.ensure_redis(self.url)
        assert endpoint.started and endpoint.pid
        self.pid = endpoint.pid

    def stop(self) -> None:
        self.local.stop("redis")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    srv = PrivateRedis(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    srv = PrivateRedis(tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def make_settings(names: Callable[[str], str]) -> Callable[..., RedisSettings]:
    prefix = names("refq")

    def make(url: str, **fields: object) -> RedisSettings:
        base: dict[str, object] = {
            "url": url,
            "key_prefix": prefix,
            "refresh_interval_s": 60.0,  # tests refresh explicitly unless they test the interval
            "op_timeout_s": 0.5,
            "reconnect_backoff_max_s": 0.4,
            "max_accepted_per_interval": 10_000,
        }
        return RedisSettings(**{**base, **fields})

    return make


def features(seed: int, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: (rng.normal(size=(n, DIM)) + shift).astype(np.float32) for m in MODALITIES}


def expected_stats(rows: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(1), (2) and the threshold of (13), in float64 numpy, independent of core.drf.distribution."""
    rows = rows.astype(np.float64)
    mean = rows.mean(axis=0)
    squared = ((rows - mean) ** 2).sum(axis=1)
    sigma = float(np.sqrt(squared.mean()))
    return mean, sigma, float(np.exp(-squared / (2 * sigma**2)).mean())


def assert_stats_match(stats, rows: np.ndarray) -> None:
    mean, sigma, threshold = expected_stats(rows)
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    assert float(stats.sigma) == pytest.approx(sigma, rel=1e-5)
    assert float(stats.threshold) == pytest.approx(threshold, rel=1e-4)
    assert stats.count == len(rows)


def all_accepted(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {m: np.ones(len(rows), dtype=bool) for m, rows in batch.items()}


# --- seeding and the store ---------------------------------------------------------------------------------------


def test_seed_stores_queues_with_statistics_and_refuses_to_overwrite(server, make_settings):
    settings = make_settings(server.url)
    store = QueueStore(connect(settings), settings.key_prefix, "v1")
    seed, other = features(0, 10), features(1, 12)
    assert store.seed(seed, capacity=L)
    state = store.read(contents=True)
    assert state is not None
    for m in MODALITIES:
        np.testing.assert_array_equal(state[m].features, seed[m])
        assert (state[m].capacity, state[m].dim, state[m].length) == (L, DIM, 10)
        assert_stats_match(state[m].stats, seed[m])
        assert_stats_match(state[m].reference, seed[m])

    assert not store.seed(other, capacity=L)  # already seeded: nothing written
    np.testing.assert_array_equal(store.read(contents=True)["image"].features, seed["image"])

    assert store.seed(other, capacity=L, overwrite=True)
    again = store.read(contents=True)
    np.testing.assert_array_equal(again["text"].features, other["text"])
    assert again["text"].generation > state["text"].generation
    assert again["text"].version > state["text"].version


def test_bad_seed_input_is_a_clear_error(server, make_settings):
    settings = make_settings(server.url)
    store = QueueStore(connect(settings), settings.key_prefix, "v1")
    good = features(0, 4)
    with pytest.raises(ValueError, match="missing"):
        store.seed({"image": good["image"]}, capacity=L)
    with pytest.raises(ValueError, match="NaN"):
        store.seed({**good, "text": np.full((4, DIM), np.nan, dtype=np.float32)}, capacity=L)
    with pytest.raises(ValueError, match="capacity"):
        store.seed(good, capacity=3)
    with pytest.raises(ValueError, match="feature matrix"):
        store.seed({**good, "image": np.zeros(DIM, dtype=np.float32)}, capacity=L)
    with pytest.raises(ReferenceQueueError, match="seed them first"):
        store.reset()
    assert store.read() is None


# --- the worker ---------------------------------------------------------------------------------------------------


def test_propose_appends_accepted_rows_in_order_and_evicts_the_oldest(server, make_settings):
    with ReferenceQueues(make_settings(server.url), "v1") as queues:
        seed = features(0, L)
        assert queues.seed(seed, capacity=L)
        batch = features(1, 4, shift=0.5)
        batch["image"][2] = np.nan  # never enqueued, whatever the mask says
        mask = {"image": np.array([True, False, True, True]), "text": np.array([True, True, False, False])}
        queues.propose(batch, mask)
        state = queues.store.read(contents=True)
        np.testing.assert_array_equal(
            state["image"].features, np.concatenate([seed["image"][2:], batch["image"][[0, 3]]])
        )
        np.testing.assert_array_equal(
            state["text"].features, np.concatenate([seed["text"][2:], batch["text"][:2]])
        )
        assert state["image"].length == L and queues.dropped_updates == 1


def test_worker_statistics_drift_and_metrics_follow_the_stream(server, make_settings):
    metrics = Metrics()
    with ReferenceQueues(make_settings(server.url), "v1", metrics=metrics) as queues:
        seed = features(0, L)
        queues.seed(seed, capacity=L)
        seeded = queues.stats()
        assert seeded is not None and queues.drift() == {"image": 0.0, "text": 0.0}
        batch = features(1, 4, shift=3.0)
        mask = {m: np.array([True, True, True, False]) for m in MODALITIES}
        queues.propose(batch, mask)
        assert queues.stats() is seeded  # the hot path never reloads
        assert queues.refresh()
        live = queues.stats()
        assert live is not seeded
        state = queues.store.read(contents=True)
        for m in MODALITIES:
            contents = np.concatenate([seed[m][3:], batch[m][:3]])
            assert_stats_match(live[m], contents)
            assert_stats_match(state[m].stats, contents)  # written back by compare-and-set
            ref_mean, ref_sigma, _ = expected_stats(seed[m])
            drift = np.linalg.norm(contents.astype(np.float64).mean(axis=0) - ref_mean) / ref_sigma
            assert queues.drift()[m] == pytest.approx(drift, rel=1e-4)
            assert sample_value(metrics, "reference_drift_sigmas", modality=m) == pytest.approx(
                drift, rel=1e-4
            )
            assert sample_value(metrics, "reference_acceptance_ratio", modality=m) == pytest.approx(0.75)
            assert sample_value(metrics, "reference_accepted_total", modality=m) == 3
            assert sample_value(metrics, "reference_queue_length", modality=m) == L
        assert sample_value(metrics, "redis_up") == 1


def test_cap_limits_accepted_features_per_interval_across_workers(server, make_settings):
    settings = make_settings(server.url, max_accepted_per_interval=3, accept_interval_s=600)
    with ReferenceQueues(settings, "v1") as first, ReferenceQueues(settings, "v1") as second:
        first.seed(features(0, 4), capacity=L)
        second.refresh()
        batch = features(1, 5)
        first.propose(batch, all_accepted(batch))
        state = first.store.read(contents=True)
        np.testing.assert_array_equal(state["image"].features[4:], batch["image"][:3])
        assert first.capped_updates == 2 * len(MODALITIES)
        second.propose(batch, all_accepted(batch))  # the cap is shared by the consumer group
        assert first.store.read()["image"].length == 7
        assert second.capped_updates == 5 * len(MODALITIES)


def test_a_reset_elsewhere_rejects_stale_proposals_and_wakes_the_worker(server, make_settings):
    with ReferenceQueues(make_settings(server.url), "v1") as queues:
        seed = features(0, 6)
        queues.seed(seed, capacity=L)
        queues.propose(features(1, 2), all_accepted(features(1, 2)))
        generation = queues.store.read()["image"].generation
        queues.store.reset()  # e.g. `postsense queues reset` from an operator's shell
        stale = features(2, 2)
        queues.propose(stale, all_accepted(stale))  # judged against the old reference: refused
        np.testing.assert_array_equal(queues.store.read(contents=True)["image"].features, seed["image"])
        # refresh_interval_s is 60 s: only the wake-up of the refused reply can make the worker notice this soon
        assert wait_until(
            lambda: queues._cache is not None and queues._cache.tags["image"][0] == generation + 1, 15
        )
        assert_stats_match(queues.stats()["image"], seed["image"])
        queues.propose(stale, all_accepted(stale))
        assert queues.store.read()["image"].length == 8


def test_bad_proposals_are_clear_errors(server, make_settings):
    with ReferenceQueues(make_settings(server.url), "v1") as queues:
        queues.seed(features(0, 4), capacity=L)
        good = features(1, 3)
        with pytest.raises(ValueError, match="dimension"):
            queues.propose({"image": np.zeros((3, DIM + 1), np.float32)}, {"image": np.ones(3, bool)})
        with pytest.raises(ValueError, match="one entry per feature row"):
            queues.propose(good, {m: np.ones(2, bool) for m in MODALITIES})
        with pytest.raises(ValueError, match="unknown modality"):
            queues.propose({"audio": good["image"]}, {"audio": np.ones(3, bool)})
        assert queues.store.read()["image"].length == 4


def test_unseeded_queues_leave_the_worker_without_statistics(server, make_settings):
    with ReferenceQueues(make_settings(server.url), "v1") as queues:
        assert queues.available and queues.stats() is None
        batch = features(1, 2)
        queues.propose(batch, all_accepted(batch))
        assert queues.store.read() is None and queues.dropped_updates == 4


# --- frozen mode ----------------------------------------------------------------------------------------------------


def test_frozen_mode_never_writes(server, make_settings):
    admin = ReferenceQueues(make_settings(server.url), "v1")
    admin.seed(features(0, L), capacity=L)
    admin.propose(features(1, 3), all_accepted(features(1, 3)))  # stored statistics are now stale
    admin.close()
    before = QueueStore(server.client(), make_settings(server.url).key_prefix, "v1").read(contents=True)
    assert before["image"].stats is None

    watcher = server.client()
    watcher.config_resetstat()

    def reads() -> int:  # one MULTI per read of the queues
        return int(watcher.info("commandstats").get("cmdstat_multi", {}).get("calls", 0))

    with ReferenceQueues(make_settings(server.url, mode="frozen", refresh_interval_s=0.05), "v1") as frozen:
        assert frozen.stats() is not None  # computed locally from the contents
        assert_stats_match(frozen.stats()["image"], before["image"].features)
        for i in range(5):
            batch = features(10 + i, 4)
            frozen.propose(batch, all_accepted(batch))
        proposed = reads()
        assert wait_until(lambda: reads() >= proposed + 3, 15)  # several background refreshes

    commands = {name.removeprefix("cmdstat_") for name in watcher.info("commandstats")}
    assert "multi" in commands  # the frozen worker did read
    assert not commands & {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall"}
    for name in commands:
        info = watcher.execute_command("COMMAND", "INFO", name.split("|")[0])[name.split("|")[0]]
        assert "write" not in info["flags"], f"frozen worker sent the write command {name}"
    after = QueueStore(watcher, make_settings(server.url).key_prefix, "v1").read(contents=True)
    for m in MODALITIES:
        assert after[m].tag == before[m].tag
        np.testing.assert_array_equal(after[m].features, before[m].features)


# --- several workers ----------------------------------------------------------------------------------------------

WORKER = """
import json, sys, time
import numpy as np
from connectors.reference_queues import RedisSettings, ReferenceQueues

settings = RedisSettings.model_validate_json(sys.argv[1])
mode = sys.argv[2]
with ReferenceQueues(settings, "v1") as queues:
    assert queues.stats() is not None, "worker found no statistics"
    if mode == "pair":
        rows = np.full((2, 8), 5.0, dtype=np.float32)
        queues.propose({"image": rows}, {"image": np.ones(2, bool)})
        print("proposed", flush=True)
        sys.stdin.readline()
        queues.refresh()
        print(json.dumps(queues.stats()["image"].mean.tolist()), flush=True)
    else:
        rng = np.random.default_rng(int(mode))
        for _ in range(40):
            rows = {m: rng.normal(size=(4, 8)).astype(np.float32) for m in ("image", "text")}
            queues.propose(rows, {m: np.ones(4, bool) for m in rows})
            time.sleep(0.005)  # paced, so the three workers' appends interleave
        assert queues.dropped_updates == 0, queues.dropped_updates
"""


def spawn_worker(settings: RedisSettings, mode: str) -> subprocess.Popen:
    """Another worker process; the settings travel as JSON with the (secret) URL spelled out."""
    spelled = {**settings.model_dump(mode="json"), "url": settings.url.get_secret_value()}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(spelled), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )


def test_two_worker_processes_see_each_others_accepted_features(server, make_settings):
    settings = make_settings(server.url)
    with ReferenceQueues(settings, "v1") as here:
        here.seed(features(0, L), capacity=L)
        child = spawn_worker(settings, "pair")
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "proposed"
            here.refresh()
            contents = here.store.read(contents=True)["image"].features
            np.testing.assert_array_equal(contents[-2:], np.full((2, DIM), 5.0))
            assert_stats_match(here.stats()["image"], contents)

            mine = {"image": np.full((3, DIM), -3.0, dtype=np.float32)}
            here.propose(mine, {"image": np.ones(3, bool)})
            child.stdin.write("go\n")
            child.stdin.flush()
            seen = np.array(json.loads(child.stdout.readline()))
            contents = here.store.read(contents=True)["image"].features
            np.testing.assert_array_equal(contents[-3:], mine["image"])
            np.testing.assert_allclose(seen, expected_stats(contents)[0], rtol=1e-5, atol=1e-5)
        finally:
            assert child.wait(timeout=60) == 0


def test_concurrent_workers_keep_the_queue_bounded_and_the_stats_consistent(server, make_settings):
    settings = make_settings(server.url, refresh_interval_s=0.05)
    store = QueueStore(connect(settings), settings.key_prefix, "v1")
    store.seed(features(0, L), capacity=L)
    workers = [spawn_worker(settings, str(seed)) for seed in (101, 102, 103)]
    proposed = []
    for seed in (101, 102, 103):
        rng = np.random.default_rng(seed)
        for _ in range(40):
            rows = {m: rng.normal(size=(4, DIM)).astype(np.float32) for m in MODALITIES}
            proposed += [row.tobytes() for m in MODALITIES for row in rows[m]]
    known = set(proposed) | {row.tobytes() for rows in features(0, L).values() for row in rows}
    checked = 0
    while any(w.poll() is None for w in workers):
        state = store.read(contents=True)
        for m in MODALITIES:
            assert state[m].length == len(state[m].features) <= L
            if state[m].stats is not None:  # tagged with exactly these contents
                assert_stats_match(state[m].stats, state[m].features)
                checked += 1
        time.sleep(0.01)
    assert [w.wait() for w in workers] == [0, 0, 0]
    final = store.read(contents=True)
    for m in MODALITIES:
        assert final[m].version == 1 + 3 * 40  # every append counted exactly once
        assert {row.tobytes() for row in final[m].features} <= known  # no torn or foreign rows
    assert checked > 0


# --- outages, AUTH, TLS ---------------------------------------------------------------------------------------------


def test_redis_restart_mid_stream_serves_cached_stats_and_resumes_updates(
    fresh_server, make_settings, caplog
):
    caplog.set_level(logging.INFO, logger="connectors.reference_queues")
    metrics = Metrics()
    settings = make_settings(fresh_server.url, refresh_interval_s=0.1)
    with ReferenceQueues(settings, "v1", metrics=metrics) as queues:
        seed = features(0, L)
        queues.seed(seed, capacity=L)
        for i in range(3):
            queues.propose(features(i, 2), all_accepted(features(i, 2)))
        assert queues.refresh()
        cached = queues.stats()

        fresh_server.stop()
        for i in range(20):  # the stream goes on
            queues.propose(features(10 + i, 2), all_accepted(features(10 + i, 2)))
            assert queues.stats() is cached
            time.sleep(0.02)  # the outage lasts a while: reconnect attempts happen meanwhile
        assert not queues.available and queues.dropped_updates >= 19 * 4
        assert sample_value(metrics, "redis_up") == 0
        outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_logs) == 1  # once per outage, not once per batch or per reconnect attempt

        fresh_server.start()  # an empty Redis: no persistence
        assert wait_until(lambda: queues.available, 15)
        assert sample_value(metrics, "redis_up") == 1
        state = queues.store.read(contents=True)  # re-seeded from the checkpoint queues
        np.testing.assert_array_equal(state["image"].features, seed["image"])
        assert wait_until(lambda: queues.stats() is not None and queues.stats()["image"].count == L, 15)
        batch = features(99, 2)
        queues.propose(batch, all_accepted(batch))
        np.testing.assert_array_equal(queues.store.read(contents=True)["text"].features[-2:], batch["text"])
        assert any("is back" in r.getMessage() for r in caplog.records)


def test_a_worker_started_while_redis_is_down_seeds_once_it_answers(fresh_server, make_settings):
    fresh_server.stop()
    with ReferenceQueues(make_settings(fresh_server.url), "v1") as queues:
        assert not queues.available and queues.stats() is None
        seed = features(0, L)
        with pytest.raises(redis.ConnectionError):
            queues.seed(seed, capacity=L)
        batch = features(1, 2)
        queues.propose(batch, all_accepted(batch))  # no statistics yet: dropped, no crash
        fresh_server.start()
        assert wait_until(lambda: queues.stats() is not None, 15)
        assert_stats_match(queues.stats()["text"], seed["text"])
        np.testing.assert_array_equal(queues.store.read(contents=True)["image"].features, seed["image"])


def test_a_hung_redis_never_blocks_the_consumer_past_the_op_timeout(fresh_server, make_settings):
    settings = make_settings(fresh_server.url, op_timeout_s=0.3)
    with ReferenceQueues(settings, "v1") as queues:
        queues.seed(features(0, L), capacity=L)
        cached = queues.stats()
        os.kill(fresh_server.pid, signal.SIGSTOP)
        try:
            batch = features(1, 2)
            started = time.monotonic()
            queues.propose(batch, all_accepted(batch))
            elapsed = time.monotonic() - started
            assert not queues.available and queues.stats() is cached
            assert elapsed < 0.3 + 1.0, f"propose blocked {elapsed:.2f} s on a hung Redis"
        finally:
            os.kill(fresh_server.pid, signal.SIGCONT)
        assert wait_until(lambda: queues.available, 15)


def test_auth_comes_from_the_url_and_a_wrong_password_does_not_crash(tmp_path, make_settings, caplog):
    secured = PrivateRedis(tmp_path, password="s3cret-pw")
    try:
        with ReferenceQueues(make_settings(secured.url), "v1") as queues:
            assert queues.seed(features(0, 4), capacity=L) and queues.available
        wrong = secured.url.replace("s3cret-pw", "not-it")
        with ReferenceQueues(make_settings(wrong), "v1") as queues:
            assert not queues.available and queues.stats() is None
            queues.propose(features(1, 2), all_accepted(features(1, 2)))
        assert "not-it" not in caplog.text and "s3cret-pw" not in caplog.text
    finally:
        secured.stop()


def test_tls_comes_from_a_rediss_url(tmp_path, make_settings):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    port = free_port()
    proc = subprocess.Popen(
        [str(redis_binary()), "--port", "0", "--tls-port", str(port), "--tls-cert-file", cert, "--tls-key-file", key,
         "--tls-ca-cert-file", cert, "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        probe = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        if not wait_until(lambda: proc.poll() is None and _answers(probe), 10):
            pytest.skip("this redis-server does not serve TLS")
        with ReferenceQueues(make_settings(url), "v1") as queues:
            assert queues.seed(features(0, 4), capacity=L) and queues.available
            assert queues.stats()["text"].count == 4
        plain = f"redis://127.0.0.1:{port}/0"
        with ReferenceQueues(make_settings(plain), "v1") as queues:
            assert not queues.available
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
