"""Redis stopped and restarted under a running service: scoring never waits for it, the queues come back.

The reference-queue unit tests (tests/connectors/test_reference_queues.py) cover the client's outage handling; this is the
service-level case, on a redis-server of the test's own so the session's Redis is never disturbed.
"""

from __future__ import annotations

import pytest
import redis
from helpers import report_counts, wait_until
from stream_support import LABELS, Collector, Running, produce_posts, stream_settings, valid_posts

from connectors.metrics import Metrics
from core.inference import Predictor
from core.model import create_model
from stream.components import open_reference_queues
from stream.local_services import Endpoints, LocalServices, free_port
from stream.runtime import Service

pytestmark = pytest.mark.services


def test_scoring_continues_while_redis_is_down_and_the_queues_return_with_it(services, names, tmp_path):
    predictor = Predictor.from_model(create_model("tiny", labels=LABELS))
    local = LocalServices(tmp_path / "redis")
    url = f"redis://127.0.0.1:{free_port()}/0"
    local.ensure_redis(url)
    try:
        settings = stream_settings(
            Endpoints(services.bootstrap, url),
            names,
            partitions=2,
            redis={"refresh_interval_s": 0.5, "op_timeout_s": 0.3, "reconnect_backoff_max_s": 1.0},
        )
        metrics = Metrics()
        queues = open_reference_queues(
            settings, predictor, metrics
        )  # seeded from the checkpoint, as serve does
        posts = valid_posts(30, "q")
        collector = Collector()
        try:
            with Running(Service(settings, predictor, metrics=metrics, queues=queues, on_output=collector)):
                produce_posts(settings, posts[:10])
                assert collector.wait_for(10)
                assert metrics.registry.get_sample_value("postsense_redis_up") == 1

                local.stop("redis")
                produce_posts(settings, posts[10:20])
                assert collector.wait_for(20, timeout_s=30), "scoring stalled while Redis was down"
                assert wait_until(lambda: metrics.registry.get_sample_value("postsense_redis_up") == 0, 10)

                local.ensure_redis(url)  # back, and empty (no persistence)
                produce_posts(settings, posts[20:])
                assert collector.wait_for(30, timeout_s=30)
                up = wait_until(lambda: metrics.registry.get_sample_value("postsense_redis_up") == 1, 15)
                assert up, "never reconnected"
                # The worker re-seeded the empty Redis from the checkpoint's queues.
                client = redis.Redis.from_url(url)
                assert wait_until(lambda: client.keys(f"{settings.redis.key_prefix}:*"), 10)
                client.close()
        finally:
            queues.close()
    finally:
        local.stop_all()
    counts = report_counts(
        "redis stopped and restarted", [p["id"] for p in posts], [d["id"] for d in collector.documents]
    )
    assert counts["lost"] == 0 and counts["duplicated"] == 0 and counts["unexpected"] == 0
    # Quality scores were still published during the outage (against the cached reference statistics).
    during = [d for d in collector.documents if d["id"] in {p["id"] for p in posts[10:20]}]
    assert any(d["modalities"]["text"]["quality"] is not None for d in during)
