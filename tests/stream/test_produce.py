"""`postsense produce --dataset`: labelled samples become valid input posts, disrupted as the paper's protocol says."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from images import png_base64
from stream_support import read_topic, stream_settings

from core.contracts import Post, parse_post
from stream.feed import dataset_records, send

LABELS = ("positive", "neutral", "negative")
WORDS = "the sun is out and everyone at the park is smiling today"


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A jsonl data set in the service's own post schema plus a label, ten posts per split."""
    for split in ("train", "dev", "test"):
        lines = [
            json.dumps(
                {
                    "id": f"{split}{i}",
                    "text": f"{WORDS} {i}",
                    "image": {"base64": png_base64((10 * i, 80, 200))},
                    "label": LABELS[i % 3],
                }
            )
            for i in range(10)
        ]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def posts_of(records: list[tuple[bytes | None, Any]]) -> list[Post]:
    posts = []
    for key, value in records:
        post = parse_post(json.dumps({**value, "created_at": "2026-11-23T12:00:00Z"}).encode())
        assert isinstance(post, Post), post
        assert key == post.id.encode()
        posts.append(post)
    return posts


def test_clean_samples_become_valid_posts_with_their_label_in_metadata(dataset_dir: Path):
    posts = posts_of(list(dataset_records(f"jsonl:{dataset_dir}", "test", 0, None, None, None)))
    assert [p.id for p in posts] == [f"test{i}" for i in range(10)]
    assert [p.metadata["label"] for p in posts] == [LABELS[i % 3] for i in range(10)]
    assert all(p.metadata["disruption"] is None for p in posts)
    assert all(base64.b64decode(p.image["base64"])[:3] == b"\xff\xd8\xff" for p in posts)  # JPEG


def test_modality_fixed_discard_removes_every_image_and_keeps_the_text(dataset_dir: Path):
    posts = posts_of(list(dataset_records(f"jsonl:{dataset_dir}", "test", 0, "D", None, "image")))
    assert all(p.image is None for p in posts)
    assert all(p.text and p.text.startswith(WORDS) for p in posts)
    assert all(p.metadata["disruption"]["kind"] == "discard" for p in posts)


def test_modality_fixed_corrupt_masks_40_to_80_percent_of_the_words(dataset_dir: Path):
    posts = posts_of(list(dataset_records(f"jsonl:{dataset_dir}", "test", 0, "C", None, "text")))
    for p in posts:
        words = p.text.split()
        masked = words.count("[MASK]") / len(words)
        assert 0.35 <= masked <= 0.85, p.text  # 40-80 % of the words, rounded to whole words
        assert p.image is not None


def test_modality_random_disrupts_the_requested_share(dataset_dir: Path):
    posts = posts_of(list(dataset_records(f"jsonl:{dataset_dir}", "test", 3, "C+D", 0.4, None)))
    assert sum(p.metadata["disruption"] is not None for p in posts) == 4


def test_disrupt_without_a_strategy_is_a_clear_error(dataset_dir: Path):
    with pytest.raises(ValueError, match="--dr"):
        list(dataset_records(f"jsonl:{dataset_dir}", "test", 0, "C", None, None))
    with pytest.raises(ValueError, match="no split 'holdout'"):
        list(dataset_records(f"jsonl:{dataset_dir}", "holdout", 0, None, None, None))


@pytest.mark.services
def test_produced_posts_arrive_keyed_by_id_with_created_at_stamped(services, names, dataset_dir: Path):
    settings = stream_settings(services, names, partitions=2)
    records = list(dataset_records(f"jsonl:{dataset_dir}", "test", 0, None, None, None))
    report = send(settings, settings.kafka.input_topic, records, rate=200)
    assert (report.sent, report.failed) == (10, 0)
    got = read_topic(settings, settings.kafka.input_topic, expect=10, timeout_s=20)
    assert sorted(r.key for r in got) == sorted(k for k, _ in records)
    for r in got:
        post = parse_post(r.value)
        assert isinstance(post, Post) and post.created_at and post.created_at.endswith("Z")
