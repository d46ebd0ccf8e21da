"""The disruption protocol of the paper's section 4.1: fractions, ratios, settings, seeding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import SENTIMENT_LABELS, Dataset, ReadReport, Sample, load_image
from core.data.disruption import (
    DISRUPTION_RATIOS,
    MASK_TOKEN,
    disrupt_dataset,
    mask_words,
    modality_fixed,
    modality_random,
)

WORDS = " ".join(f"w{i}" for i in range(50))
COLOUR = (200, 100, 50)  # no pixel of the clean image is 0, so every 0 pixel is a masked one


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "clean.png"
    Image.new("RGB", (300, 200), COLOUR).save(path)
    return path


def samples(n: int, image: Path) -> list[Sample]:
    return [Sample(str(i), WORDS, image, i % 3, SENTIMENT_LABELS) for i in range(n)]


def masked_word_fraction(text: str) -> float:
    words = text.split()
    return sum(w == MASK_TOKEN for w in words) / len(words)


def zero_pixel_fraction(img: Image.Image) -> float:
    return float((np.asarray(img) == 0).all(axis=2).mean())


def test_mask_words_keeps_whitespace_and_the_fraction_in_range() -> None:
    rng = np.random.default_rng(0)
    text, fraction = mask_words("a  b\tc d", 0.5, rng)
    assert text.count(MASK_TOKEN) == 2 and fraction == 0.5
    assert re.findall(r"\s+", text) == ["  ", "\t", " "]
    assert mask_words("word", 0.4, rng) == (MASK_TOKEN, 1.0)  # a corrupted text loses at least one word


@pytest.mark.parametrize("setting", ["C", "D", "C+D"])
def test_fixed_text_disruption_touches_only_text(image_path: Path, setting: str) -> None:
    clean = samples(40, image_path)
    out, stats = modality_fixed(clean, "text", setting, seed=3)
    assert stats.total == 40 and stats.skipped_single_modality == 0
    discards = sum(s.text is None for s in out)
    assert discards == {"C": 0, "D": 40, "C+D": 20}[setting]
    for before, after in zip(clean, out, strict=True):
        assert after.image == before.image and after.label == before.label
        assert after.disruption is not None and after.disruption.modality == "text"
        if after.text is not None:
            assert after.disruption.kind == "corrupt"
            assert 0.4 <= masked_word_fraction(after.text) <= 0.8
            assert after.disruption.fraction == masked_word_fraction(after.text)


def test_corrupted_image_has_40_to_80_percent_zero_pixels_at_model_size(image_path: Path) -> None:
    out, _ = modality_fixed(samples(20, image_path), "image", "C", seed=5)
    fractions = []
    for sample in out:
        assert sample.text == WORDS  # the other modality is intact
        img = load_image(sample)
        assert img is not None and img.size == (224, 224)
        fraction = zero_pixel_fraction(img)
        assert fraction == pytest.approx(sample.disruption.fraction, abs=1 / 224**2)
        fractions.append(fraction)
    assert min(fractions) >= 0.4 and max(fractions) <= 0.8
    assert max(fractions) - min(fractions) > 0.1  # the fraction is drawn per sample
    assert zero_pixel_fraction(load_image(samples(1, image_path)[0])) == 0.0


def test_same_seed_same_disruption_other_seed_differs(image_path: Path) -> None:
    clean = samples(30, image_path)
    first, _ = modality_random(clean, 0.6, "C+D", seed=11)
    again, _ = modality_random(clean, 0.6, "C+D", seed=11)
    other, _ = modality_random(clean, 0.6, "C+D", seed=12)
    assert first == again
    assert first != other
    corrupted = [
        s
        for s in first
        if s.disruption and s.disruption.kind == "corrupt" and s.disruption.modality == "image"
    ]
    assert corrupted, "seed 11 should corrupt some image"
    twin = again[first.index(corrupted[0])]
    assert np.array_equal(np.asarray(load_image(corrupted[0])), np.asarray(load_image(twin)))


@pytest.mark.parametrize("dr", DISRUPTION_RATIOS)
def test_random_disruption_hits_exactly_the_ratio_and_keeps_one_modality(image_path: Path, dr: float) -> None:
    clean = samples(200, image_path)
    out, stats = modality_random(clean, dr, "C+D", seed=1)
    disrupted = [s for s in out if s.disruption is not None]
    assert len(disrupted) == stats.total == round(dr * 200)
    discards = sum(s.disruption.kind == "discard" for s in disrupted)
    assert discards == len(disrupted) // 2
    for s in disrupted:
        if s.disruption.modality == "image":
            assert s.text == WORDS
        else:
            assert s.image == image_path
    images = sum(s.disruption.modality == "image" for s in disrupted)
    assert 0.3 < images / len(disrupted) < 0.7  # a random modality, not always the same one


def test_a_sample_with_one_modality_left_is_never_disrupted(image_path: Path) -> None:
    lone_text = Sample("t", "only text here", None, 0, SENTIMENT_LABELS)
    lone_image = Sample("i", None, image_path, 1, SENTIMENT_LABELS)
    out, stats = modality_fixed([lone_text, lone_image], "text", "D", seed=0)
    assert out == [lone_text, lone_image] and stats.skipped_single_modality == 2
    out, stats = modality_random([lone_text, lone_image], 1.0, "C", seed=0)
    assert out == [lone_text, lone_image] and stats.total == 0


def test_dataset_fixed_disrupts_test_only_random_disrupts_every_split(image_path: Path) -> None:
    dataset = Dataset(
        "toy",
        SENTIMENT_LABELS,
        {"train": samples(10, image_path), "dev": samples(10, image_path), "test": samples(10, image_path)},
        ReadReport("toy"),
    )
    fixed, stats = disrupt_dataset(dataset, "fixed", "D", seed=0, modality="image")
    assert fixed["train"] == dataset["train"] and fixed["dev"] == dataset["dev"]
    assert all(s.image is None for s in fixed["test"]) and stats["test"].disrupted == {"image/discard": 10}
    random_, stats = disrupt_dataset(dataset, "random", "C", seed=0, dr=0.4)
    assert {name: s.total for name, s in stats.items()} == {"train": 4, "dev": 4, "test": 4}
    assert dataset["test"][0].disruption is None  # the input data set is left as it was


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "random", "setting": "C", "dr": 1.5}, "dr must lie in"),
        ({"strategy": "random", "setting": "C"}, "needs a ratio dr"),
        ({"strategy": "fixed", "setting": "C"}, "needs a modality"),
        ({"strategy": "fixed", "setting": "X", "modality": "text"}, "setting must be one of"),
        ({"strategy": "fixed", "setting": "C", "modality": "audio"}, "modality must be one of"),
    ],
)
def test_bad_protocol_arguments_are_clear_errors(image_path: Path, kwargs: dict, message: str) -> None:
    dataset = Dataset("toy", SENTIMENT_LABELS, {"test": samples(4, image_path)}, ReadReport("toy"))
    with pytest.raises(ValueError, match=message):
        disrupt_dataset(dataset, seed=0, **kwargs)
