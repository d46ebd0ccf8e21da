"""The README's "Python API" examples, executed as written: a checkpoint scored from Python, then the consumer
loop embedded with an output hook against the real broker."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import sklearn.datasets
from stream_support import LABELS, produce_posts, stream_settings, valid_posts

from core.checkpoint import save_checkpoint
from core.model import create_model

README = Path(__file__).resolve().parents[1] / "README.md"


def api_examples() -> list[str]:
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.services
@pytest.mark.timeout(180)
def test_readme_python_api_examples_run_as_written(
    services, names, tmp_path: Path, monkeypatch, capsys
) -> None:
    predict_example, service_example = api_examples()
    settings = stream_settings(services, names)
    k = settings.kafka
    # The files the examples name, in the directory they run in.
    monkeypatch.chdir(tmp_path)
    save_checkpoint(create_model("tiny", labels=LABELS), tmp_path / "model.ckpt")
    shutil.copy(Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg", tmp_path / "photo.jpg")
    (tmp_path / "postsense.toml").write_text(
        "[kafka]\n"
        + "".join(
            f"{field} = {json.dumps(getattr(k, field))}\n"
            for field in (
                "bootstrap_servers",
                "group_id",
                "input_topic",
                "output_topic",
                "dead_letter_topic",
                "session_timeout_ms",
                "heartbeat_interval_ms",
            )
        )
        + '[redis]\nurl = "redis://127.0.0.1:1/0"\n'  # nothing listens there: the example must not need Redis
    )
    posts = valid_posts(3, prefix=names("readme-"))
    produce_posts(settings, posts)

    namespace: dict = {}
    exec(compile(predict_example, "README.md: Predictor example", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(line.split()[0] in LABELS for line in printed)
    result = namespace["result"]
    assert result.quality_image[0] > 0 and result.quality_image[1] != result.quality_image[1]  # NaN: no image

    exec(compile(service_example, "README.md: Service example", "exec"), namespace)
    assert sorted(post_id for post_id, _ in namespace["answered"]) == sorted(p["id"] for p in posts)
    assert not namespace["worker"].is_alive()
