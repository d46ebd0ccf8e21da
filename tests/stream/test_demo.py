"""`postsense demo` end to end on the session's broker and Redis: every record answered, nothing started twice."""

import subprocess
import sys

import pytest

from core.checkpoint import save_checkpoint
from core.data.vader import build_demo_set
from core.model import create_model
from stream.local_services import kafka_answers

pytestmark = pytest.mark.services


def test_demo_answers_every_record_and_leaves_servers_it_did_not_start(services, tmp_path):
    data = build_demo_set(tmp_path / "data", seed=0, limit=120)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(create_model("tiny", labels=["positive", "neutral", "negative"]), checkpoint)
    cmd = [
        sys.executable,
        "-m",
        "stream",
        "--bootstrap-servers",
        services.bootstrap,
        "--redis-url",
        services.redis_url,
        "--checkpoint",
        str(checkpoint),
        "--set",
        "redis.key_prefix=demo-test",
        "demo",
        "--plain",
        "--posts",
        "15",
        "--rate",
        "0",
        "--dataset",
        f"jsonl:{data}",
        "--state-dir",
        str(tmp_path / "state"),
        "--timeout",
        "120",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # 15 test posts + 6 odd records: 3 not valid posts (dead letters), 3 answered with modality states
    assert "posts sent: 21   sentiment records: 18   dead letters: 3" in out.stdout
    assert "every record answered exactly as expected" in out.stdout
    assert "(abstained)" in out.stdout and "undecodable" in out.stdout
    assert "already running" in out.stdout and "stopped broker" not in out.stdout
    assert kafka_answers(services.bootstrap)  # the session's broker was not ours to stop
