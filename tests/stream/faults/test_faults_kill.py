"""A worker killed with SIGKILL in the middle of a batch (during inference, deterministically), then restarted.

tests/stream/test_cli.py kills ``postsense serve`` at a moment chosen by the clock; here the worker signals
when its third batch enters the model, and dies there. Afterwards nothing is lost, and every duplicate
comes from input offsets that were not committed when it died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import report_counts, wait_until
from stream_support import committed_offsets, produce_posts, read_topic, stream_settings, valid_posts

pytestmark = pytest.mark.services

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from core.inference import Predictor
    from core.model import create_model
    from stream.runtime import Service
    from stream.settings import load_settings

    flags, marker, delay = json.loads(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    predictor = Predictor.from_model(create_model("tiny", labels=["negative", "neutral", "positive"]))
    forward = predictor.predict

    def slow_predict(batch):  # tells the test a batch is in the model, then takes its time
        with marker.open("a") as f:
            f.write("batch\\n")
        time.sleep(delay)
        return forward(batch)

    predictor.predict = slow_predict
    Service(load_settings(None, flags), predictor).run()
    """
)


def worker(tmp_path: Path, flags: dict, marker: Path, delay_s: float) -> subprocess.Popen[bytes]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(flags), str(marker), str(delay_s)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.DEVNULL,
    )


def test_sigkill_during_inference_then_restart_loses_nothing_and_replays_only_the_uncommitted(
    services, names, tmp_path
):
    settings = stream_settings(services, names, partitions=2, batch={"max_posts": 6, "max_wait_ms": 50})
    flags = {
        "kafka": settings.kafka.model_dump(mode="json", exclude_none=True),
        "batch": settings.batch.model_dump(mode="json"),
    }
    posts = valid_posts(60, "k")
    produce_posts(settings, posts)
    marker = tmp_path / "batches"
    proc = worker(tmp_path, flags, marker, delay_s=1.0)
    try:
        assert wait_until(lambda: marker.exists() and len(marker.read_text().split()) >= 3, 90), (
            "no third batch"
        )
        proc.send_signal(signal.SIGKILL)  # batch 3 is inside the model: it is neither published nor committed
        proc.wait(10)
    finally:
        proc.kill()
    committed = committed_offsets(settings.kafka, settings.kafka.input_topic)
    before = read_topic(settings, settings.kafka.output_topic, expect=len(posts), timeout_s=3)
    assert 0 < len(before) < len(posts)

    proc = worker(tmp_path, flags, tmp_path / "batches-2", delay_s=0.0)
    out: list = []

    def all_scored() -> bool:
        out[:] = read_topic(settings, settings.kafka.output_topic, expect=len(posts), timeout_s=3)
        return len({r.key for r in out}) == len(posts)

    try:
        assert wait_until(all_scored, 90, interval_s=1), "the restarted worker did not finish"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    counts = report_counts(
        "worker killed mid-batch, restarted", [p["id"] for p in posts], [r.key.decode() for r in out]
    )
    assert counts["lost"] == 0 and counts["unexpected"] == 0
    # Every duplicate was an input record at or past the committed offset of its partition when the worker died.
    sources = [json.loads(r.value)["source"] for r in out]
    seen: set[tuple[int, int]] = set()
    for src in sources:
        where = (src["partition"], src["offset"])
        if where in seen:
            assert src["offset"] >= committed.get(src["partition"], 0), where
        seen.add(where)
    assert counts["duplicated"] <= (settings.batch.max_inflight_batches + 1) * settings.batch.max_posts
