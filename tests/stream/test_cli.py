"""`postsense produce` and `postsense serve` as processes: SIGTERM drains and commits, kill -9 loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families
from stream_support import cli, committed_offsets, read_topic, stream_settings, valid_posts, wait_committed

from stream.local_services import free_port
from stream.settings import Settings

pytestmark = pytest.mark.services


def serve(settings: Settings, checkpoint: Path, metrics_port: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = cli(settings, "serve", checkpoint=checkpoint, metrics_port=metrics_port)
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def owned_partitions(port: int) -> set[str]:
    """The input partitions a ``serve`` process owns now, read from its consumer-lag series."""
    try:
        status, exposition = http_get(port, "/metrics")
    except OSError:  # not listening yet
        return set()
    return {
        sample.labels["partition"]
        for family in text_string_to_metric_families(exposition if status == 200 else "")
        if family.name == "postsense_consumer_lag_messages"
        for sample in family.samples
    }


def produce_jsonl(settings: Settings, tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "posts.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    done = subprocess.run(cli(settings, "produce", "--jsonl", str(path)), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert f"sent {len(lines)} records (0 failed)" in done.stdout.decode()


def outputs_by_source(records: list[Any]) -> dict[tuple[int, int], list[str]]:
    """(input partition, input offset) -> post ids published for it (sentiment records carry their source)."""
    out: dict[tuple[int, int], list[str]] = {}
    for r in records:
        doc = json.loads(r.value)
        out.setdefault((doc["source"]["partition"], doc["source"]["offset"]), []).append(doc["id"])
    return out


def test_sigterm_drains_commits_and_exits_zero(services, names, tiny_checkpoint, tmp_path):
    settings = stream_settings(services, names, partitions=2, batch={"max_posts": 8, "max_wait_ms": 50})
    posts = valid_posts(300)
    produce_jsonl(settings, tmp_path, [json.dumps(p).encode() for p in posts] + [b"{not json"])
    port = free_port()
    proc = serve(settings, tiny_checkpoint, metrics_port=port)
    try:
        first = read_topic(settings, settings.kafka.output_topic, expect=1, timeout_s=60)
        assert first, "serve published nothing"
        assert http_get(port, "/readyz") == (200, "ready\n")  # model loaded, partitions assigned
        status, exposition = http_get(port, "/metrics")
        assert status == 200 and "postsense_posts_consumed_total{" in exposition
        proc.send_signal(signal.SIGTERM)  # mid-stream
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "SIGTERM" in stderr.decode()
    committed = committed_offsets(settings.kafka, settings.kafka.input_topic)
    out = outputs_by_source(read_topic(settings, settings.kafka.output_topic, expect=len(posts), timeout_s=3))
    # Everything below a committed offset was published (the dead letter has no sentiment record).
    dlq = read_topic(settings, settings.kafka.dead_letter_topic, expect=1, timeout_s=2)
    dead = {
        (
            json.loads(dict(r.headers)["postsense.dlq"])["source"]["partition"],
            json.loads(dict(r.headers)["postsense.dlq"])["source"]["offset"],
        )
        for r in dlq
    }
    assert committed, "nothing committed"
    for partition, end in committed.items():
        for offset in range(end):
            assert (partition, offset) in out or (partition, offset) in dead, (partition, offset)
    # ...and nothing published past what was committed: the drain committed every batch it finished.
    assert all(offset < committed.get(partition, 0) for partition, offset in out)


def test_killed_mid_stream_restart_loses_nothing_duplicates_bounded(
    services, names, tiny_checkpoint, tmp_path
):
    settings = stream_settings(services, names, partitions=2, batch={"max_posts": 8, "max_wait_ms": 50})
    posts = valid_posts(300)
    produce_jsonl(settings, tmp_path, [json.dumps(p).encode() for p in posts])
    proc = serve(settings, tiny_checkpoint)
    try:
        assert read_topic(settings, settings.kafka.output_topic, expect=20, timeout_s=60)
        proc.kill()  # no drain, no commit of the batches in hand
        proc.wait(timeout=10)
    finally:
        proc.kill()
    before = committed_offsets(settings.kafka, settings.kafka.input_topic)
    assert sum(before.values()) < len(posts), "the first process finished before it was killed"
    proc = serve(settings, tiny_checkpoint)
    try:
        ends = {0: 0, 1: 0}
        out = read_topic(settings, settings.kafka.output_topic, expect=len(posts), timeout_s=120)
        for r in out:
            doc = json.loads(r.value)
            ends[doc["source"]["partition"]] = max(
                ends[doc["source"]["partition"]], doc["source"]["offset"] + 1
            )
        committed = wait_committed(settings, ends)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    seen = Counter(json.loads(r.value)["id"] for r in out)
    assert set(seen) == {p["id"] for p in posts}  # no post lost
    duplicates = sum(n - 1 for n in seen.values())
    # Only the uncommitted batches can be replayed: those in the pipeline plus one finished, not yet committed.
    bound = (settings.batch.max_inflight_batches + 1) * settings.batch.max_posts
    assert duplicates <= bound
    assert committed == ends


def test_produce_rejects_a_missing_file_with_a_clear_error(services, names, tmp_path):
    settings = stream_settings(services, names, partitions=1)
    done = subprocess.run(
        cli(settings, "produce", "--jsonl", str(tmp_path / "absent.jsonl")), capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert "absent.jsonl" in done.stderr.decode() and "Traceback" not in done.stderr.decode()


def test_serve_without_checkpoint_says_what_is_missing(services, names):
    settings = stream_settings(services, names, partitions=1)
    done = subprocess.run(cli(settings, "serve"), capture_output=True, timeout=60)
    assert done.returncode == 2
    assert "model.checkpoint" in done.stderr.decode()


def test_member_evicted_while_frozen_learns_it_lost_its_partitions_and_nothing_is_lost(
    services, names, tiny_checkpoint, tmp_path
):
    settings = stream_settings(
        services,
        names,
        partitions=2,
        batch={"max_posts": 8, "max_wait_ms": 50},
        kafka={"session_timeout_ms": 3000, "heartbeat_interval_ms": 500},
    )
    posts = valid_posts(400)
    produce_jsonl(settings, tmp_path, [json.dumps(p).encode() for p in posts])
    frozen = serve(settings, tiny_checkpoint)
    other = None
    try:
        assert read_topic(settings, settings.kafka.output_topic, expect=1, timeout_s=60)
        frozen.send_signal(signal.SIGSTOP)  # misses heartbeats: the group evicts it after the session timeout
        port = free_port()
        other = serve(settings, tiny_checkpoint, metrics_port=port)
        # Evicted once the other member owns both partitions (it exports a lag series per owned partition).
        assert wait_until(lambda: owned_partitions(port) == {"0", "1"}, 60), (
            "the frozen member was never evicted"
        )
        frozen.send_signal(signal.SIGCONT)  # wakes up evicted, with batches in hand
        out = read_topic(settings, settings.kafka.output_topic, expect=len(posts), timeout_s=120)
        ends = {0: 0, 1: 0}
        for r in out:
            source = json.loads(r.value)["source"]
            ends[source["partition"]] = max(ends[source["partition"]], source["offset"] + 1)
        committed = wait_committed(settings, ends)
        for proc in (frozen, other):
            proc.send_signal(signal.SIGTERM)
        _, frozen_log = frozen.communicate(timeout=60)
        other.communicate(timeout=60)
    finally:
        for proc in (frozen, other):
            if proc is not None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
    assert frozen.returncode == 0 and other.returncode == 0
    # It learnt it was evicted (on_partitions_lost, so it committed nothing for them), not revoked.
    assert "(evicted); nothing is committed for them" in frozen_log.decode()
    seen = Counter(json.loads(r.value)["id"] for r in out)
    assert set(seen) == {p["id"] for p in posts}
    assert committed == ends
