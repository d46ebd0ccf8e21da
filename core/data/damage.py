"""Realistic damage to one modality of a post, beside the paper's C/D protocol (core/data/disruption.py), seeded.

What posts really arrive with, each a test condition named ``<modality>/<kind>``:

images
  * ``truncated``: the JPEG file cut after a uniform 30-70 % of its bytes, then decoded exactly as the service
    decodes it (``core.data.images.decode_image`` with the service's default limits).  Pillow refuses a truncated
    JPEG ("image file is truncated"), so almost every such image fails to decode; the service would then score the
    post as image ``undecodable``, i.e. on its text alone, and so does the evaluation: **a truncated JPEG that does
    not decode counts as a missing image** (counted in ``DamageStats.became_missing``, reasons in ``reasons``).
  * ``placeholder``: the grey "image unavailable" card a CDN or client shows instead (one fixed 400x300 image).
  * ``jpeg_q5``: the image (as the service decodes it) re-encoded as a JPEG at quality 5.
  * ``thumbnail``: the image reduced to a 32-pixel thumbnail (longest side); the evaluation's bicubic resize to
    the encoder's 224x224 input scales it back up, as the service's preprocessing would.
  * ``solid``: a solid colour (one of ``SOLID_COLOURS``, drawn per post): a failed render or blank upload.
  * ``mismatched``: another post's image (a seeded derangement over the posts with an image).  The image is
    intact, just wrong: no quality score can see it, so it has no quality target; it is reported.

texts
  * ``url_only``: the text is only a link (``https://t.co/`` and 10 random characters).
  * ``tags_only``: only the post's hashtags and mentions, in order; a post without any has an empty text, which
    the service treats as a missing text (counted in ``became_missing``).
  * ``three_words``: 3 words left (chosen at random, kept in order); shorter texts are unchanged (``unchanged``).
  * ``typos``: 30 % of the letters and digits (at least one) replaced by another of the same kind (case kept).

As in the paper's protocol, a post whose other modality is already missing is left alone (one modality always
stays intact; ``skipped_single_modality``).  Every draw comes from a generator seeded by ``seed``, the kind and the
post's id, so a post is damaged the same way whichever fold or split it lands in.
"""

from __future__ import annotations

import io
import string
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.contracts import DEFAULT_LIMITS, MODALITIES
from core.data.disruption import modality_fixed
from core.data.images import DRAFT_SIZE, FORMATS, decode_image
from core.data.records import ImageSource, Sample, open_image

IMAGE_DAMAGE: tuple[str, ...] = ("truncated", "placeholder", "jpeg_q5", "thumbnail", "solid", "mismatched")
TEXT_DAMAGE: tuple[str, ...] = ("url_only", "tags_only", "three_words", "typos")
#: Every realistic damage condition, ``<modality>/<kind>``.
DAMAGE_CONDITIONS: tuple[str, ...] = (
    *(f"image/{k}" for k in IMAGE_DAMAGE),
    *(f"text/{k}" for k in TEXT_DAMAGE),
)
#: Conditions no quality score is expected to flag (the modality is intact, only wrong).
NO_QUALITY_TARGET: tuple[str, ...] = ("image/mismatched",)
TRUNCATE_RANGE = (0.3, 0.7)
JPEG_QUALITY = 5
THUMBNAIL_SIDE = 32
WORDS_LEFT = 3
TYPO_FRACTION = 0.3
SOLID_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (255, 255, 255), (128, 128, 128), (64, 64, 64), (192, 192, 192), (255, 0, 0), (0, 128, 0),
    (0, 0, 255), (255, 255, 0), (255, 128, 0), (128, 0, 128), (0, 255, 255), (255, 192, 203), (139, 69, 19),
    (0, 0, 128), (245, 245, 220),
)  # fmt: skip


@dataclass
class DamageStats:
    """What one damage pass did: posts damaged, left alone, turned into a missing modality or unchanged."""

    damaged: int = 0
    skipped_single_modality: int = 0
    became_missing: int = 0
    unchanged: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, object]:
        return {
            "damaged": self.damaged,
            "skipped_single_modality": self.skipped_single_modality,
            "became_missing": self.became_missing,
            "unchanged": self.unchanged,
            "reasons": dict(self.reasons),
        }


def _rng(seed: int, kind: str, sample_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{kind}:{sample_id}".encode())])


# --- images -----------------------------------------------------------------------------------------------------


def image_bytes(source: ImageSource) -> bytes:
    """The bytes of an image source; an in-memory image is written as a JPEG (quality 90) first."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, Path):
        return source.read_bytes()
    out = io.BytesIO()
    source.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def service_decode(data: bytes) -> tuple[Image.Image | None, str | None]:
    """Decode bytes as the service does with its default limits: (RGB image, None) or (None, reason)."""
    outcome = decode_image(
        data, DEFAULT_LIMITS.max_image_bytes, DEFAULT_LIMITS.max_image_pixels, DRAFT_SIZE, FORMATS
    )
    return outcome.image, outcome.reason


def truncate(data: bytes, fraction: float) -> bytes:
    """The first round(fraction * len) bytes."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    return data[: round(fraction * len(data))]


@lru_cache(maxsize=1)
def placeholder_card() -> Image.Image:
    """The "image unavailable" card: light grey, a broken-picture icon and the words, 400x300."""
    card = Image.new("RGB", (400, 300), (230, 230, 230))
    draw = ImageDraw.Draw(card)
    draw.rectangle((150, 80, 250, 160), outline=(150, 150, 150), width=4)
    draw.polygon([(160, 150), (190, 110), (215, 140), (228, 125), (240, 150)], fill=(170, 170, 170))
    draw.line((150, 160, 250, 80), fill=(200, 60, 60), width=5)
    draw.text((150, 190), "Image unavailable", fill=(110, 110, 110))
    return card


def jpeg_recompressed(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """The image re-encoded as a JPEG at ``quality``."""
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """The image reduced so its longest side is ``side`` pixels (aspect kept)."""
    small = image.convert("RGB").copy()
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    return small


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _damage_image(
    sample: Sample, kind: str, rng: np.random.Generator, stats: DamageStats, meta: dict[str, object]
) -> ImageSource | None:
    assert sample.image is not None
    if kind == "truncated":
        meta["truncated_at"] = fraction = float(rng.uniform(*TRUNCATE_RANGE))
        data = truncate(image_bytes(sample.image), fraction)
        decoded, reason = service_decode(data)
        if decoded is None:
            stats.became_missing += 1
            stats.reasons[reason or "undecodable"] += 1
        return decoded
    if kind == "placeholder":
        return placeholder_card()
    if kind == "solid":
        return solid(SOLID_COLOURS[int(rng.integers(len(SOLID_COLOURS)))])
    decoded, reason = service_decode(image_bytes(sample.image))
    original = decoded if decoded is not None else open_image(sample.image)
    if kind == "jpeg_q5":
        return jpeg_recompressed(original)
    if kind == "thumbnail":
        return thumbnail(original)
    raise ValueError(f"unknown image damage {kind!r}; known: {IMAGE_DAMAGE}")


# --- texts ------------------------------------------------------------------------------------------------------


def url_only(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits
    return "https://t.co/" + "".join(alphabet[i] for i in rng.integers(len(alphabet), size=10))


def tags_only(text: str) -> str:
    """The hashtags and mentions of ``text``, in order, space-separated ("" when it has none)."""
    return " ".join(w for w in text.split() if w[:1] in ("#", "@") and len(w) > 1)


def words_left(text: str, rng: np.random.Generator, keep: int = WORDS_LEFT) -> str:
    """``keep`` words chosen at random, in their order; a text of at most ``keep`` words is returned as it is."""
    words = text.split()
    if len(words) <= keep:
        return text
    chosen = np.sort(rng.choice(len(words), size=keep, replace=False))
    return " ".join(words[i] for i in chosen)


def typos(text: str, rng: np.random.Generator, fraction: float = TYPO_FRACTION) -> str:
    """round(fraction * n) of the n letters and digits (at least one) replaced by a different one of the same
    kind (lower case, upper case, digit)."""
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c.isascii() and c.isalnum()]
    if not positions:
        return text
    count = min(len(positions), max(1, round(fraction * len(positions))))
    for i in rng.choice(len(positions), size=count, replace=False):
        c = chars[positions[i]]
        pool = (
            string.digits
            if c.isdigit()
            else string.ascii_uppercase
            if c.isupper()
            else string.ascii_lowercase
        )
        others = pool.replace(c, "")
        chars[positions[i]] = others[int(rng.integers(len(others)))]
    return "".join(chars)


def _damage_text(text: str, kind: str, rng: np.random.Generator, stats: DamageStats) -> str | None:
    if kind == "url_only":
        return url_only(rng)
    if kind == "tags_only":
        tags = tags_only(text)
        if not tags:
            stats.became_missing += 1
            stats.reasons["no_hashtag_or_mention"] += 1
            return None
        return tags
    if kind == "three_words":
        out = words_left(text, rng)
        stats.unchanged += out == text
        return out
    if kind == "typos":
        return typos(text, rng)
    raise ValueError(f"unknown text damage {kind!r}; known: {TEXT_DAMAGE}")


# --- conditions -------------------------------------------------------------------------------------------------


def damage_samples(samples: Sequence[Sample], condition: str, seed: int) -> tuple[list[Sample], DamageStats]:
    """``samples`` under one damage ``condition`` (``<modality>/<kind>``); the other modality untouched.

    Damaged samples keep their id and label and carry ``meta["damage"] = condition`` (a truncated image also
    ``meta["truncated_at"]``, the share of its bytes kept).
    """
    modality, _, kind = condition.partition("/")
    if condition not in DAMAGE_CONDITIONS or modality not in MODALITIES:
        raise ValueError(f"unknown damage condition {condition!r}; known: {DAMAGE_CONDITIONS}")
    stats = DamageStats()
    with_image = [i for i, s in enumerate(samples) if s.image is not None]
    donors: dict[int, int] = {}
    if (
        kind == "mismatched" and len(with_image) > 1
    ):  # a cyclic shift of a random order: nobody keeps their own
        order = np.random.default_rng([seed, zlib.crc32(b"mismatched")]).permutation(with_image)
        donors = {int(a): int(b) for a, b in zip(order, np.roll(order, -1), strict=True)}
    out = []
    for index, sample in enumerate(samples):
        if sample.image is None or sample.text is None:
            stats.skipped_single_modality += 1
            out.append(sample)
            continue
        rng = _rng(seed, condition, sample.id)
        meta: dict[str, object] = {**sample.meta, "damage": condition}
        if modality == "image":
            if kind == "mismatched":
                image = samples[donors[index]].image if index in donors else sample.image
            else:
                image = _damage_image(sample, kind, rng, stats, meta)
            out.append(replace(sample, image=image, meta=meta))
        else:
            out.append(replace(sample, text=_damage_text(sample.text, kind, rng, stats), meta=meta))
        stats.damaged += 1
    return out, stats


def damaged_variants(
    samples: Sequence[Sample],
    seed: int,
    settings: Sequence[str] = ("C", "D"),
    damage: Sequence[str] = DAMAGE_CONDITIONS,
) -> dict[str, tuple[list[Sample], dict[str, object]]]:
    """Every damaged variant of ``samples``, by condition name, with what the damage did: the paper's
    modality-fixed ``settings`` of either modality (``"image/C"``; stats under ``"fixed image/C"``) and each realistic
    ``damage`` condition (stats under ``"damage image/placeholder"``).  What the evaluation tests and the product
    regime trains on."""
    variants: dict[str, tuple[list[Sample], dict[str, object]]] = {}
    for modality in MODALITIES:
        for setting in settings:
            disrupted, fixed = modality_fixed(samples, modality, setting, seed)  # type: ignore[arg-type]
            variants[f"{modality}/{setting}"] = (
                disrupted,
                {f"fixed {modality}/{setting}": dict(fixed.disrupted)},
            )
    for condition in damage:
        damaged, stats = damage_samples(samples, condition, seed)
        variants[condition] = (damaged, {f"damage {condition}": stats.to_dict()})
    return variants
