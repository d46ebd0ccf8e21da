"""The VADER demo set: real tweets from the pinned source archive, labelled by the cut-offs, paired
with generated images that carry some (not all) of the label, deterministically."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from core.data import SENTIMENT_LABELS, DataFormatError, build_demo_set, load_image
from core.data.vader import SDIST_NAME, fetch_sdist, load_vader, read_rated_tweets, render_image

REPO_CACHE = Path(__file__).resolve().parents[3] / "data" / "cache" / SDIST_NAME


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data dir; the archive is copied from the repo's cache when a build already fetched it."""
    root = tmp_path_factory.mktemp("vader")
    if REPO_CACHE.is_file():
        (root / "cache").mkdir()
        shutil.copy(REPO_CACHE, root / "cache" / SDIST_NAME)
    return root


@pytest.fixture(scope="module")
def small_set(data_dir: Path) -> Path:
    return build_demo_set(data_dir, seed=0, mismatch=0.2, limit=200)


def read_posts(folder: Path) -> list[dict]:
    return [
        json.loads(line) for split in ("train", "dev", "test") for line in (folder / f"{split}.jsonl").open()
    ]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_archive_holds_the_4200_rated_tweets_with_the_documented_label_counts(data_dir: Path) -> None:
    tweets = read_rated_tweets(fetch_sdist(data_dir / "cache"))
    assert len(tweets) == 4200
    labels = Counter(
        "positive" if t.valence > 0.5 else "negative" if t.valence < -0.5 else "neutral" for t in tweets
    )
    assert labels == {"positive": 2300, "neutral": 838, "negative": 1062}
    assert tweets[1].text == "Yay. Another good phone interview."


def test_small_build_labels_follow_the_cutoffs(small_set: Path) -> None:
    posts = read_posts(small_set)
    assert len(posts) == 200
    for p in posts:
        valence = p["metadata"]["valence"]
        assert p["label"] == ("positive" if valence > 0.5 else "negative" if valence < -0.5 else "neutral")
        assert p["text"] and p["image"] == {"path": f"images/{p['metadata']['tweet_id']}.jpg"}


def test_mismatch_fraction_is_exact(small_set: Path, data_dir: Path) -> None:
    posts = read_posts(small_set)
    assert sum(p["metadata"]["mismatched"] for p in posts) == 40
    assert all(p["metadata"]["mismatched"] == (p["metadata"]["image_label"] != p["label"]) for p in posts)
    clean = read_posts(build_demo_set(data_dir, seed=0, mismatch=0.0, limit=30))
    assert not any(p["metadata"]["mismatched"] for p in clean)


def test_same_seed_gives_the_same_bytes(small_set: Path, data_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(data_dir / "cache", tmp_path / "cache")
    rebuilt = build_demo_set(tmp_path, seed=0, mismatch=0.2, limit=200)
    assert rebuilt != small_set and digest(rebuilt) == digest(small_set)
    other = build_demo_set(tmp_path, seed=1, mismatch=0.2, limit=200)
    assert digest(other) != digest(small_set)


def test_split_is_stratified_70_15_15_and_loads_as_a_dataset(small_set: Path, data_dir: Path) -> None:
    dataset = load_vader(data_dir, seed=0, mismatch=0.2, limit=200)
    assert dataset.sizes() == {"train": 140, "dev": 30, "test": 30}
    totals = Counter(s.label_name for split in dataset.splits.values() for s in split)
    for split, size in dataset.sizes().items():
        for name, count in dataset.label_counts(split).items():
            assert abs(count - totals[name] * size / 200) <= 1
    sample = dataset["test"][0]
    img = load_image(sample, size=None)
    assert img is not None and img.size == (224, 224)
    assert Image.open(sample.image).format == "JPEG"
    assert dataset.report.kept == 200 and dataset.report.images_undecodable == 0


def test_attribution_travels_with_the_set(small_set: Path) -> None:
    readme = (small_set / "README.md").read_text()
    metadata = json.loads((small_set / "metadata.json").read_text())
    assert "Hutto" in readme and "MIT" in readme and "third-party" in readme
    assert "MIT" in metadata["attribution"]["license"] and metadata["mismatched"] == 40


def test_images_carry_label_signal_but_not_the_whole_label() -> None:
    """An image-only classifier on colour histograms beats chance clearly, yet stays far from perfect."""

    def features(img: Image.Image) -> np.ndarray:
        hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255
        return np.concatenate([np.histogram(hsv[..., c], bins=8, range=(0, 1))[0] for c in range(3)]) / 224**2

    x, y = [], []
    for label_index, label in enumerate(SENTIMENT_LABELS):
        for j in range(50):
            x.append(features(render_image(label, np.random.default_rng([7, label_index, j]))))
            y.append(label_index)
    xs, ys = np.array(x), np.array(y)
    train = np.arange(len(ys)) % 2 == 0
    accuracy = (
        LogisticRegression(max_iter=3000).fit(xs[train], ys[train]).predict(xs[~train]) == ys[~train]
    ).mean()
    assert 0.5 < accuracy < 0.95  # chance is 1/3


def test_bad_arguments_and_a_tampered_archive_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mismatch"):
        build_demo_set(tmp_path, mismatch=1.5)
    with pytest.raises(ValueError, match="seed"):
        build_demo_set(tmp_path, seed=-1)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / SDIST_NAME).write_bytes(b"not the archive")
    with pytest.raises(DataFormatError, match="SHA-256"):
        build_demo_set(tmp_path, limit=10)
