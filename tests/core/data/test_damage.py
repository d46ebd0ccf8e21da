"""Realistic damage: each kind does what it says, deterministically per seed; a truncated JPEG decodes exactly as
the service decodes it, or is a missing image."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from connectors.media import MediaLimits, decode_image_bytes
from core.contracts import ModalityState
from core.data import Sample
from core.data.damage import (
    DAMAGE_CONDITIONS,
    SOLID_COLOURS,
    damage_samples,
    jpeg_recompressed,
    placeholder_card,
    tags_only,
    thumbnail,
    truncate,
    typos,
    url_only,
    words_left,
)
from core.data.images import decode_image

LABELS = ("positive", "neutral", "negative")
TEXT = "Sunny morning at the #beach with @anna and friends, 10/10 would go again"


def photo(seed: int = 0, size: tuple[int, int] = (96, 64), progressive: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, progressive=progressive)
    return out.getvalue()


def posts(n: int = 6) -> list[Sample]:
    return [Sample(f"p{i}", f"{TEXT} {i}", photo(i), i % 3, LABELS) for i in range(n)]


def test_every_condition_is_deterministic_with_a_seed_and_keeps_id_and_label() -> None:
    samples = posts()
    for condition in DAMAGE_CONDITIONS:
        first, stats = damage_samples(samples, condition, seed=1)
        again, _ = damage_samples(samples, condition, seed=1)
        assert [(s.id, s.label) for s in first] == [(s.id, s.label) for s in samples]
        modality = condition.split("/")[0]
        for a, b, original in zip(first, again, samples, strict=True):
            assert a.meta["damage"] == condition
            if modality == "image":
                assert a.text == original.text  # the other modality is untouched
                same = (a.image is None and b.image is None) or _pixels(a.image) == _pixels(b.image)
                assert same
            else:
                assert a.image is original.image and a.text == b.text
        assert stats.damaged == len(samples)
    texts = [s.text for s in damage_samples(samples, "text/typos", seed=1)[0]]
    assert texts != [s.text for s in damage_samples(samples, "text/typos", seed=2)[0]]


def _pixels(source: object) -> bytes:
    if isinstance(source, Image.Image):
        return source.tobytes()
    if isinstance(source, bytes):
        return source
    return str(source).encode()


def test_truncated_jpeg_decodes_as_the_service_decodes_it_or_is_missing() -> None:
    samples = [Sample(f"p{i}", "text", photo(i, progressive=i % 2 == 1), 0, LABELS) for i in range(8)]
    damaged, stats = damage_samples(samples, "image/truncated", seed=0)
    limits = MediaLimits()
    for original, sample in zip(samples, damaged, strict=True):
        assert isinstance(original.image, bytes)
        fraction = sample.meta["truncated_at"]
        assert 0.3 <= fraction <= 0.7
        service = decode_image_bytes(truncate(original.image, fraction), limits)  # the same cut, as served
        if sample.image is None:  # undecodable for the service: a missing image
            assert service.state is ModalityState.undecodable and service.reason == "truncated"
        else:
            assert isinstance(sample.image, Image.Image) and service.image is not None
            assert service.image.tobytes() == sample.image.tobytes()
    assert stats.became_missing == sum(s.image is None for s in damaged)
    assert sum(stats.reasons.values()) == stats.became_missing
    # Pillow refuses a baseline JPEG cut in half, as the service does.
    cut = truncate(photo(0), 0.5)
    assert decode_image_bytes(cut, limits).reason == "truncated"


def test_the_service_and_the_evaluation_share_one_decode() -> None:
    data = photo(3)
    limits = MediaLimits()
    service = decode_image_bytes(data, limits)
    core = decode_image(
        data, limits.max_image_bytes, limits.max_image_pixels, limits.draft_size, limits.formats
    )
    assert service.state is core.state is ModalityState.ok
    assert service.image is not None and core.image is not None
    assert service.image.tobytes() == core.image.tobytes() and service.nbytes == len(data)
    assert decode_image(b"", 10, 10, (8, 8), ("JPEG",)).state is ModalityState.empty
    assert decode_image(b"not an image", 100, 100, (8, 8), ("JPEG",)).reason == "not_an_image"


def test_image_damage_kinds() -> None:
    image = Image.open(io.BytesIO(photo(0, size=(120, 80)))).convert("RGB")
    small = thumbnail(image)
    assert max(small.size) == 32 and small.size == (32, 21)
    low = jpeg_recompressed(image)
    assert Image.open(io.BytesIO(low)).format == "JPEG" and len(low) < len(jpeg_recompressed(image, 95))
    card = placeholder_card()
    assert card.size == (400, 300) and card is placeholder_card()
    samples = posts()
    solid = damage_samples(samples, "image/solid", seed=0)[0]
    for sample in solid:
        assert isinstance(sample.image, Image.Image)
        colour = sample.image.getpixel((0, 0))
        assert isinstance(colour, tuple) and colour in SOLID_COLOURS
        assert sample.image.getextrema() == tuple((c, c) for c in colour)  # one colour everywhere
    placeholder = damage_samples(samples, "image/placeholder", seed=0)[0]
    assert all(s.image is card for s in placeholder)


def test_mismatched_gives_every_post_another_posts_image() -> None:
    samples = posts(7)
    damaged, _ = damage_samples(samples, "image/mismatched", seed=0)
    originals = [s.image for s in samples]
    assert all(d.image is not s.image for d, s in zip(damaged, samples, strict=True))
    assert sorted(map(id, (d.image for d in damaged))) == sorted(map(id, originals))  # a permutation


def test_text_damage_kinds() -> None:
    rng = np.random.default_rng(0)
    assert re.fullmatch(r"https://t\.co/[A-Za-z0-9]{10}", url_only(rng))
    assert tags_only(TEXT) == "#beach @anna"
    assert tags_only("no tags here") == ""
    left = words_left(TEXT, np.random.default_rng(0))
    words = TEXT.split()
    assert len(left.split()) == 3
    positions = [words.index(w) for w in left.split()]
    assert positions == sorted(positions)  # kept in order
    assert words_left("two words", rng) == "two words"
    typed = typos(TEXT, np.random.default_rng(0))
    assert len(typed) == len(TEXT)
    alnum = [i for i, c in enumerate(TEXT) if c.isalnum()]
    changed = [i for i in alnum if typed[i] != TEXT[i]]
    assert len(changed) == round(0.3 * len(alnum))
    assert all(typed[i].isdigit() == TEXT[i].isdigit() for i in changed)
    assert [c for i, c in enumerate(typed) if i not in alnum] == [
        c for i, c in enumerate(TEXT) if i not in alnum
    ]


def test_tags_only_without_tags_is_a_missing_text_and_single_modality_posts_are_left_alone() -> None:
    samples = [
        Sample("a", "nothing tagged", photo(0), 0, LABELS),
        Sample("b", "#tagged post", photo(1), 1, LABELS),
        Sample("c", "text only post", None, 2, LABELS),
    ]
    damaged, stats = damage_samples(samples, "text/tags_only", seed=0)
    assert damaged[0].text is None and damaged[1].text == "#tagged" and damaged[2] is samples[2]
    assert (stats.became_missing, stats.skipped_single_modality, stats.damaged) == (1, 1, 2)
    with pytest.raises(ValueError, match="unknown damage condition"):
        damage_samples(samples, "image/blurred", seed=0)
