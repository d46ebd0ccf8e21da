"""Kafka faults against real brokers, every post counted in and out.

Covered elsewhere and not repeated here: kill -9 and restart of the worker process and SIGTERM drains
(tests/stream/test_cli.py), a graceful stop and restart, a second member joining, a batch slower than
max.poll.interval.ms (tests/stream/test_service.py), publisher-level producer recreation (tests/stream/test_publisher.py).
Faults that restart a broker use a broker of the test's own, never the session's.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

import pytest
from helpers import (
    Broker,
    S3Server,
    as_client,
    proxied_broker,
    report_counts,
    sample_value,
    wait_until,
)
from kafka import TopicPartition
from stream_support import (
    Collector,
    Running,
    committed_offsets,
    produce_posts,
    read_topic,
    stream_settings,
    valid_posts,
    wait_committed,
)

from connectors.kafka import ensure_topics
from connectors.metrics import Metrics
from stream.local_services import Endpoints
from stream.runtime import Service
from stream.settings import Settings

pytestmark = pytest.mark.services


def merge_ends(ends: dict[int, int], more: dict[int, int]) -> dict[int, int]:
    return {p: max(ends.get(p, 0), more.get(p, 0)) for p in ends.keys() | more.keys()}


def out_ids(settings: Settings, expect: int, timeout_s: float = 30.0) -> list[str]:
    """Post ids of the sentiment records on the output topic (the record key is the post id)."""
    records = read_topic(settings, settings.kafka.output_topic, expect=expect, timeout_s=timeout_s)
    for r in records:
        assert json.loads(r.value)["id"] == r.key.decode()  # consumers can deduplicate on the key
    return [r.key.decode() for r in records]


def worker_threads(client_id: str) -> list[str]:
    """Live kafka-python I/O threads of a client id (they are named after it)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(client_id)]


def test_produce_failing_commits_nothing_past_what_was_published_and_recovers(
    services, names, predictor, tmp_path, caplog
):
    broker, proxy = proxied_broker(tmp_path / "broker")
    try:
        settings = stream_settings(
            Endpoints(broker.bootstrap, services.redis_url),
            names,
            partitions=2,
            kafka={"produce_timeout_s": 2.0, "request_timeout_ms": 1500, "client_id": "postsense-worker"},
        )
        feeder = as_client(settings, "feeder")  # the test's own producer is never refused
        posts = valid_posts(40, "f")
        first_ends = produce_posts(feeder, posts[:16])
        metrics = Metrics()
        caplog.set_level(logging.INFO, logger="stream.publisher")
        with Running(Service(settings, predictor, metrics=metrics)) as running:
            assert wait_committed(settings, first_ends) == first_ends
            published_before = len(out_ids(settings, expect=16))

            proxy.refuse_produce_from = (
                "postsense-worker"  # the output and dead-letter topics are now unreachable
            )
            ends = merge_ends(first_ends, produce_posts(feeder, posts[16:]))
            assert wait_until(lambda: sample_value(metrics, "publish_failures_total") >= 1, 20)
            # Several produce timeouts and retries: the producer is recreated at the third failed attempt.
            assert wait_until(lambda: sample_value(metrics, "producer_recreated_total") >= 1, 30)
            during = out_ids(settings, expect=10**6, timeout_s=2)
            committed_during = committed_offsets(settings.kafka, settings.kafka.input_topic)
            assert running.thread.is_alive() and running.error is None  # retrying, not crashed

            proxy.refuse_produce_from = None
            assert wait_committed(settings, ends, timeout_s=60) == ends
            final = out_ids(settings, expect=len(posts))
        refused = proxy.refused
        # Every producer the publisher gave up on was closed, not left retrying on its own I/O thread.
        assert wait_until(lambda: not worker_threads("postsense-worker"), 10), worker_threads(
            "postsense-worker"
        )
    finally:
        proxy.stop()
        broker.stop()
    counts = report_counts("produce refused then restored", [p["id"] for p in posts], final)
    assert published_before == 16
    assert len(during) == 16, "something was published while the output topic was unreachable"
    # Nothing past what was published is committed: the offsets stayed where the first 16 posts left them.
    assert committed_during == first_ends
    assert refused > 0
    assert counts["lost"] == 0 and counts["unexpected"] == 0
    assert counts["duplicated"] <= (settings.batch.max_inflight_batches + 1) * settings.batch.max_posts
    assert any("publishing failed" in r.getMessage() for r in caplog.records)
    assert any("publishing recovered" in r.getMessage() for r in caplog.records)


def test_memory_broker_restart_service_survives_reconnects_and_recreates_its_producer(
    services, names, predictor, tmp_path, caplog
):
    # Tansu's memory engine forgets everything on restart (topics, records, offsets, producer ids): what was
    # in it is the broker's loss. The service must live through it and score everything sent afterwards.
    broker = Broker(tmp_path / "broker").start()
    try:
        settings = stream_settings(
            Endpoints(broker.bootstrap, services.redis_url),
            names,
            partitions=4,
            kafka={"produce_timeout_s": 3.0, "request_timeout_ms": 2000},
        )
        before, after = valid_posts(20, "before"), valid_posts(20, "after")
        metrics = Metrics()
        collector = Collector()
        caplog.set_level(logging.INFO, logger="stream")
        with Running(Service(settings, predictor, metrics=metrics, on_output=collector)) as running:
            produce_posts(settings, before)
            assert collector.wait_for(len(before))
            broker.restart(down_s=2)
            k = settings.kafka
            ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=4)
            ends = produce_posts(settings, after)
            assert collector.wait_for(len(before) + len(after), timeout_s=90), len(collector.documents)
            assert wait_committed(settings, ends, timeout_s=30) == ends
            assert running.thread.is_alive() and running.error is None
            republished = out_ids(settings, expect=len(after))
    finally:
        broker.stop()
    ids = [d["id"] for d in collector.documents]
    counts = report_counts("memory broker restarted", [p["id"] for p in before + after], ids)
    assert counts["lost"] == 0
    # The group is gone with the broker: a batch in hand when that is noticed is published but its offsets
    # are not committed (its partitions were lost), so it is read again: duplicates bounded by the pipeline.
    assert counts["duplicated"] <= (settings.batch.max_inflight_batches + 1) * settings.batch.max_posts
    assert set(republished) == {p["id"] for p in after}  # the new broker holds what came after
    # Reported: the broken idempotent producer was replaced, and the group membership was re-established.
    assert sample_value(metrics, "producer_recreated_total") >= 1
    assert sample_value(metrics, "rebalances_total", event="assigned") >= 2
    assert any("recreating the Kafka producer" in r.getMessage() for r in caplog.records)


PARTITIONS = 2  # of the persistent-broker test


def broker_lost_a_commit(log: Path) -> bool:
    """Whether Tansu's S3 engine says a stored offset commit is unreadable (truncated by the kill)."""
    return "EOF while parsing a value" in log.read_text(errors="replace")


@pytest.mark.parametrize("crash", [False, True], ids=["restarted", "killed"])
def test_persistent_broker_restart_loses_nothing_acknowledged(services, names, predictor, tmp_path, crash):
    if S3Server.binary() is None:
        pytest.skip("s3rver not installed (npm install --prefix .run/node s3rver@3.7.1)")
    s3 = S3Server(tmp_path / "s3").start()
    broker = Broker(tmp_path / "broker", storage="s3://tansu/", env=s3.engine_env()).start()
    try:
        settings = stream_settings(
            Endpoints(broker.bootstrap, services.redis_url),
            names,
            partitions=PARTITIONS,
            kafka={"produce_timeout_s": 3.0, "request_timeout_ms": 2000},
            batch={"max_posts": 4, "max_wait_ms": 50},
        )
        posts = valid_posts(60, "s3-")
        ends = produce_posts(settings, posts)  # every one acknowledged by the broker
        collector = Collector()  # sees each batch once every record of it was acknowledged
        with Running(Service(settings, predictor, on_output=collector)) as running:
            assert collector.wait_for(8, timeout_s=60)
            broker.restart(sig=signal.SIGKILL if crash else signal.SIGTERM, down_s=1)  # mid-stream
            committed = wait_committed(settings, ends, timeout_s=120)
            broken = crash and committed != ends and broker_lost_a_commit(tmp_path / "broker" / "broker.log")
            if not broken:
                assert committed == ends
                assert running.thread.is_alive() and running.error is None
                final = out_ids(settings, expect=len(posts), timeout_s=60)
        # Leaving the block asserted that the service stopped, even against a broker that fails every OffsetFetch.
    finally:
        broker.stop()
        s3.stop()
    if broken:
        pytest.skip(
            "kill -9 landed inside an offset commit: Tansu 0.6's S3 engine kept an empty commit object and now "
            "fails every OffsetFetch of this group (broker log: 'EOF while parsing a value', then a panic), so no "
            "client can read or resume the group; the service stopped cleanly, which is what is checked here"
        )
    name = "persistent broker " + ("killed" if crash else "restarted")
    ids = [p["id"] for p in posts]
    acknowledged = report_counts(
        name + ", acknowledged to the service", ids, [d["id"] for d in collector.documents]
    )
    on_topic = report_counts(name + ", on the output topic", ids, final)
    # The service's side: every input record scored and acknowledged, replays only of what was uncommitted.
    assert acknowledged["lost"] == 0 and acknowledged["unexpected"] == 0
    replay_bound = (settings.batch.max_inflight_batches + 1) * settings.batch.max_posts
    if crash:
        # kill -9 can also cost the group's last acknowledged offset commit of each partition (the S3 engine's
        # loss of its last writes, below), so each partition may replay one more batch: measured 16 = 12 + 4.
        replay_bound += PARTITIONS * settings.batch.max_posts
    assert acknowledged["duplicated"] <= replay_bound
    if not crash:
        assert on_topic["lost"] == 0 and on_topic["unexpected"] == 0
    # After kill -9, Tansu 0.6's S3 engine can reuse the offsets of the last records it acknowledged, so a
    # few acknowledged output records may be overwritten: the broker's loss, printed above, not asserted.


def test_second_worker_joins_then_leaves_mid_stream_nothing_lost_or_doubled(services, names, predictor):
    settings = stream_settings(services, names, partitions=4, batch={"max_posts": 4, "max_wait_ms": 50})
    sent: list[str] = []
    ends: dict[int, int] = {}
    stop_feeding = threading.Event()

    def feed() -> None:  # a steady stream while the group changes under it
        while not stop_feeding.is_set():
            chunk = valid_posts(4, f"r{len(sent)}-")
            ends.update(merge_ends(ends, produce_posts(settings, chunk)))
            sent.extend(p["id"] for p in chunk)
            stop_feeding.wait(0.2)  # pacing, not waiting for anything

    a_metrics, b_metrics = Metrics(), Metrics()
    a, b = Collector(), Collector()
    feeder = threading.Thread(target=feed, daemon=True)
    every_partition = {TopicPartition(settings.kafka.input_topic, p) for p in range(4)}
    with Running(Service(settings, predictor, metrics=a_metrics, on_output=a)) as first:
        feeder.start()
        assert a.wait_for(1)
        with Running(Service(settings, predictor, metrics=b_metrics, on_output=b)) as second:
            assert wait_until(second.service.ready, 30), "the second worker never got partitions"
            assert wait_until(lambda: len(b.documents) >= 8, 30), "the second worker scored nothing"
        # The second worker has left (drained and committed); the first takes every partition back. How many
        # rebalances that takes depends on timing (a leave while the first member is still rejoining folds two
        # into one), so wait for the ownership itself, not for a count of assignments. Bound: the leave is seen
        # at the next heartbeat (1 s), a revoke may wait up to the session timeout (6 s) for the pipeline, and
        # a join on Tansu takes about half the session timeout, twice when the leader's metadata changed.
        assert wait_until(lambda: first.service.assignment() == every_partition, 60), (
            first.service.assignment()
        )
        scored = len(
            a.documents
        )  # ...and it scores new posts of every partition, the second worker's included
        assert wait_until(
            lambda: {d["source"]["partition"] for d in a.documents[scored:]} == {0, 1, 2, 3}, 30
        )
        stop_feeding.set()
        feeder.join(10)
        assert wait_committed(settings, ends, timeout_s=60) == ends
    final = out_ids(settings, expect=len(sent))
    counts = report_counts("second worker joined then left", sent, final)
    assert counts["lost"] == 0 and counts["unexpected"] == 0
    # Graceful rebalances commit exactly what was published before handing a partition over, and drop what was
    # read but not sealed: nothing is published twice.
    assert counts["duplicated"] == 0
    assert sample_value(a_metrics, "rebalances_total", event="revoked") >= 1
    for m in (a_metrics, b_metrics):
        assert sample_value(m, "rebalances_total", event="lost") == 0
