"""The disruption protocol of the paper's section 4.1, seeded.

* corrupt: an image gets a random fraction in [0.4, 0.8] of its pixels set to 0 (individual random
  pixels, applied at model-input size by :func:`core.data.records.load_image`); a text gets the same
  kind of fraction of its words replaced by ``[MASK]``.
* discard: the modality is removed (None), i.e. missing.
* modality-fixed: training is clean; one fixed modality of every evaluated sample is disrupted.
* modality-random: a ratio ``dr`` of the samples, in training and evaluation, gets a random modality
  disrupted.
* settings: C corrupts only, D discards only, C+D discards exactly half of the disrupted samples
  (rounded down) and corrupts the rest.

At least one modality of every sample stays intact: a sample whose other modality is already
missing is left alone and counted in :attr:`DisruptionStats.skipped_single_modality`.
The dev split follows training (clean under modality-fixed), so model selection never sees the
test-time disruption.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from core.contracts import MODALITIES, Modality
from core.data.records import Dataset, Disruption, Sample

Setting = Literal["C", "D", "C+D"]
Kind = Literal["corrupt", "discard"]
SETTINGS: tuple[Setting, ...] = ("C", "D", "C+D")
DISRUPTION_RATIOS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
CORRUPT_RANGE = (0.4, 0.8)
MASK_TOKEN = "[MASK]"


@dataclass
class DisruptionStats:
    """What a disruption pass did: counts per ``modality/kind`` and the samples it had to skip."""

    disrupted: Counter[str] = field(default_factory=Counter)
    skipped_single_modality: int = 0

    @property
    def total(self) -> int:
        return sum(self.disrupted.values())


def mask_words(
    text: str, fraction: float, rng: np.random.Generator, token: str = MASK_TOKEN
) -> tuple[str, float]:
    """Replace round(fraction * words) words (at least one) by ``token``, keeping the whitespace.

    Returns the new text and the fraction actually masked (short texts cannot hit every fraction).
    """
    parts = re.split(r"(\s+)", text)
    words = [i for i, p in enumerate(parts) if p and not p.isspace()]
    if not words:
        return text, 0.0
    k = min(len(words), max(1, round(fraction * len(words))))
    for i in rng.choice(len(words), size=k, replace=False):
        parts[words[i]] = token
    return "".join(parts), k / len(words)


def disrupt_sample(sample: Sample, modality: Modality, kind: Kind, rng: np.random.Generator) -> Sample:
    """One sample with ``modality`` corrupted or discarded; the other modality is untouched."""
    if kind == "discard":
        changes: dict[str, Any] = {modality: None}
        record = Disruption(modality, "discard")
    elif modality == "text":
        assert sample.text is not None
        text, fraction = mask_words(sample.text, rng.uniform(*CORRUPT_RANGE), rng)
        changes = {"text": text}
        record = Disruption("text", "corrupt", fraction)
    else:
        # the pixel mask is drawn lazily by load_image, from this fraction and seed
        record = Disruption("image", "corrupt", float(rng.uniform(*CORRUPT_RANGE)), int(rng.integers(2**63)))
        changes = {}
    return replace(sample, disruption=record, **changes)


def _present(sample: Sample, modality: Modality) -> bool:
    return (sample.image if modality == "image" else sample.text) is not None


def _kinds(count: int, setting: Setting, rng: np.random.Generator) -> list[Kind]:
    """Kinds for ``count`` disrupted samples; C+D: floor(count/2) discards, shuffled."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    discards = {"C": 0, "D": count, "C+D": count // 2}[setting]
    discard: list[Kind] = ["discard"]
    corrupt: list[Kind] = ["corrupt"]
    kinds = discard * discards + corrupt * (count - discards)
    return [kinds[i] for i in rng.permutation(count)]


def _apply(
    samples: Sequence[Sample], chosen: list[tuple[int, Modality]], setting: Setting, rng: np.random.Generator
) -> tuple[list[Sample], DisruptionStats]:
    """Disrupt the chosen (index, modality) pairs, skipping those that would leave no modality intact."""
    stats = DisruptionStats()
    eligible = []
    for index, modality in chosen:
        other: Modality = "text" if modality == "image" else "image"
        if _present(samples[index], modality) and _present(samples[index], other):
            eligible.append((index, modality))
        else:
            stats.skipped_single_modality += 1
    out = list(samples)
    for (index, modality), kind in zip(eligible, _kinds(len(eligible), setting, rng), strict=True):
        out[index] = disrupt_sample(samples[index], modality, kind, rng)
        stats.disrupted[f"{modality}/{kind}"] += 1
    return out, stats


def modality_fixed(
    samples: Sequence[Sample], modality: Modality, setting: Setting, seed: int
) -> tuple[list[Sample], DisruptionStats]:
    """Disrupt ``modality`` of every sample (apply to evaluation samples only; training stays clean)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return _apply(samples, [(i, modality) for i in range(len(samples))], setting, np.random.default_rng(seed))


def modality_random(
    samples: Sequence[Sample], dr: float, setting: Setting, seed: int
) -> tuple[list[Sample], DisruptionStats]:
    """Disrupt a uniformly random modality of exactly round(dr * n) randomly chosen samples."""
    if not 0.0 <= dr <= 1.0:
        raise ValueError(f"disruption ratio dr must lie in [0, 1], got {dr}")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.permutation(len(samples))[: round(dr * len(samples))].tolist())
    chosen = [(i, MODALITIES[int(rng.integers(2))]) for i in picked]
    return _apply(samples, chosen, setting, rng)


def disrupt_dataset(
    dataset: Dataset,
    strategy: Literal["fixed", "random"],
    setting: Setting,
    seed: int,
    modality: Modality | None = None,
    dr: float | None = None,
) -> tuple[Dataset, dict[str, DisruptionStats]]:
    """Apply a strategy to the right splits: fixed disrupts ``test`` only, random every split.

    Each split gets its own seed derived from ``seed`` so that the splits' disruptions are independent.
    """
    out: dict[str, list[Sample]] = {}
    stats: dict[str, DisruptionStats] = {}
    for offset, (name, samples) in enumerate(dataset.splits.items()):
        split_seed = seed * 1000 + offset
        if strategy == "fixed":
            if modality is None:
                raise ValueError("modality-fixed disruption needs a modality ('image' or 'text')")
            if name != "test":
                out[name] = list(samples)
                continue
            out[name], stats[name] = modality_fixed(samples, modality, setting, split_seed)
        elif strategy == "random":
            if dr is None:
                raise ValueError(
                    f"modality-random disruption needs a ratio dr, e.g. one of {DISRUPTION_RATIOS}"
                )
            out[name], stats[name] = modality_random(samples, dr, setting, split_seed)
        else:
            raise ValueError(f"strategy must be 'fixed' or 'random', got {strategy!r}")
    return replace(dataset, splits=out), stats
