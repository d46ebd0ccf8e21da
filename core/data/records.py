"""Records shared by every reader: a labelled image-text sample, a split data set and a read report.

Real social-media data is dirty: tweets arrive as bytes in unknown encodings, image files go missing
or are truncated. The readers never crash on such rows; they turn them into missing modalities and
*count* them in a :class:`ReadReport`, so a user can see how much of the data actually arrived.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.contracts import Modality

SENTIMENT_LABELS: tuple[str, ...] = ("positive", "neutral", "negative")
"""Label order of the 3-class sets, as in the CLMLF/PACL 10-fold files (0 positive, 1 neutral, 2 negative)."""

TUMEMO_LABELS: tuple[str, ...] = ("angry", "bored", "calm", "fear", "happy", "love", "sad")
"""TumEmo's 7 emotions, in the (alphabetical) index order its published splits use."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")
MAX_PROBLEMS = 20
"""How many example problem messages a report keeps (the counts are always complete)."""

ImageSource = Path | bytes | Image.Image


class DataFormatError(ValueError):
    """A data set cannot be read at all (missing label file, unknown spec...): said clearly, once."""


@dataclass(frozen=True)
class Disruption:
    """What the disruption protocol (paper, section 4.1) did to one sample.

    ``kind`` is ``corrupt`` (pixels / words masked) or ``discard`` (modality removed). For a corrupted
    image the mask is applied lazily by :func:`load_image` at model-input resolution, so the masked
    fraction is exact on what the encoder sees; ``fraction`` and ``seed`` fix that mask.
    """

    modality: Modality
    kind: Literal["corrupt", "discard"]
    fraction: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Sample:
    """One labelled image-text pair; ``text``/``image`` None means that modality is missing."""

    id: str
    text: str | None
    image: ImageSource | None
    label: int
    label_names: tuple[str, ...]
    disruption: Disruption | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label_name(self) -> str:
        return self.label_names[self.label]


@dataclass
class ReadReport:
    """Counts of everything a reader repaired, dropped or found missing."""

    source: str
    rows: int = 0
    kept: int = 0
    rows_malformed: int = 0
    texts_repaired: int = 0
    texts_missing: int = 0
    images_missing: int = 0
    images_undecodable: int = 0
    images_remote: int = 0
    dropped_no_modality: int = 0
    merge: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        """Keep the first few problem messages as examples; the counters hold the totals."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "kept": self.kept,
            "rows_malformed": self.rows_malformed,
            "texts_repaired": self.texts_repaired,
            "texts_missing": self.texts_missing,
            "images_missing": self.images_missing,
            "images_undecodable": self.images_undecodable,
            "images_remote": self.images_remote,
            "dropped_no_modality": self.dropped_no_modality,
            "merge": dict(self.merge),
            "problems": list(self.problems),
        }

    def summary(self) -> str:
        """A few human-readable lines for the CLI."""
        d = self.to_dict()
        lines = [f"{self.source}: {self.rows} rows read, {self.kept} samples kept"]
        counts = {k: v for k, v in d.items() if isinstance(v, int) and v and k not in ("rows", "kept")}
        if counts:
            lines.append("  " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()))
        if self.merge:
            lines.append("  label merge: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.merge.items())))
        lines.extend(f"  e.g. {p}" for p in self.problems[:5])
        return "\n".join(lines)


@dataclass
class Dataset:
    """Named splits of samples sharing one label set, plus how they were read."""

    name: str
    label_names: tuple[str, ...]
    splits: dict[str, list[Sample]]
    report: ReadReport
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Sample]:
        if split not in self.splits:
            raise KeyError(f"{self.name} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]

    def sizes(self) -> dict[str, int]:
        return {name: len(samples) for name, samples in self.splits.items()}

    def label_counts(self, split: str) -> dict[str, int]:
        counts = Counter(s.label for s in self[split])
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}


# --- text -------------------------------------------------------------------------------------------


def _gbk_pairs_look_latin(raw: bytes) -> bool:
    """True if a GBK reading would glue a high byte to an ASCII letter or digit.

    Real GBK text (Chinese characters, full-width punctuation) almost always has a high trail byte;
    cp1252 text ("“Hi”", "café") decodes as GBK by accident only by pairing a lone high byte with
    the next ASCII character, which is what this detects.
    """
    i = 0
    while i < len(raw):
        if raw[i] < 0x80:
            i += 1
            continue
        if i + 1 < len(raw) and raw[i + 1] < 0x80 and chr(raw[i + 1]).isalnum():
            return True
        i += 2
    return False


#: The encodings :func:`decode_text` tries, in this order (GBK and cp1252 swap places when a GBK reading
#: would pair high bytes with ASCII letters).
TEXT_ENCODINGS: tuple[str, ...] = ("utf-8", "gbk", "cp1252")


def decode_text(raw: bytes) -> tuple[str, str | None]:
    """Decode a post's text file; never raises. Returns (text, the encoding that decoded it).

    UTF-8 first (a BOM is dropped), then GBK (the MVSA files' usual other encoding), then cp1252; GBK is
    tried after cp1252 when its reading would pair high bytes with ASCII letters (see above). When none of
    them decodes the bytes, the encoding is None and the text is the UTF-8 reading with U+FFFD replacements.
    """
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    order = ("cp1252", "gbk") if _gbk_pairs_look_latin(raw) else ("gbk", "cp1252")
    for encoding in order:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace"), None


def decode_tweet_bytes(raw: bytes) -> tuple[str, bool]:
    """Decode a tweet's raw bytes with :func:`decode_text`; never raises. Returns (text, repaired).

    UTF-8 is not a repair; GBK, cp1252 and the final UTF-8 reading with U+FFFD replacement are.
    """
    text, encoding = decode_text(raw)
    return text, encoding != "utf-8"


def read_text_file(path: Path, report: ReadReport) -> str | None:
    """A tweet file as text, or None (counted) when absent or blank."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        report.texts_missing += 1
        report.problem(f"text file missing: {path}")
        return None
    text, repaired = decode_tweet_bytes(raw)
    report.texts_repaired += repaired
    text = text.strip()
    if not text:
        report.texts_missing += 1
        return None
    return text


# --- images -----------------------------------------------------------------------------------------


def open_image(source: ImageSource) -> Image.Image:
    """Decode an image source fully into RGB (raises OSError/ValueError if it cannot be decoded)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img.load()
    return img.convert("RGB")


def image_is_decodable(source: Path | bytes) -> bool:
    """Whether the image decodes to the end of its data.

    JPEGs are decoded in draft mode (DCT scaled down 8x): that still reads every entropy-coded
    byte, so truncated files are caught, at a fraction of a full decode's cost.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))
            img.load()
        return True
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError):
        return False


def checked_image(source: Path | bytes | None, report: ReadReport, what: str) -> Path | bytes | None:
    """The source if it decodes; otherwise None, counted as a missing or undecodable image."""
    if source is None or (isinstance(source, Path) and not source.is_file()):
        report.images_missing += 1
        report.problem(f"image missing: {what}")
        return None
    if not image_is_decodable(source):
        report.images_undecodable += 1
        report.problem(f"image undecodable: {what}")
        return None
    return source


def mask_pixels(img: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    """Set round(fraction * H * W) pixels, chosen uniformly at random, to 0 in every channel.

    Individual random pixels (not patches) are masked: the paper says "randomly masking 40-80% of
    pixels" and gives no patch size.
    """
    arr = np.array(img.convert("RGB"))
    h, w = arr.shape[:2]
    flat = arr.reshape(h * w, -1)
    flat[rng.choice(h * w, size=round(fraction * h * w), replace=False)] = 0
    return Image.fromarray(arr)


def load_image(sample: Sample, size: tuple[int, int] | None = (224, 224)) -> Image.Image | None:
    """The sample's image as RGB at ``size`` (None keeps the original size), pending pixel mask applied.

    Returns None when the image is missing (or discarded). The mask of a corrupted image is applied
    after resizing so exactly the protocol's fraction of the encoder's input pixels is zero.
    """
    if sample.image is None:
        return None
    img = open_image(sample.image)
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    d = sample.disruption
    if d is not None and d.modality == "image" and d.kind == "corrupt":
        assert d.fraction is not None and d.seed is not None
        img = mask_pixels(img, d.fraction, np.random.default_rng(d.seed))
    return img


# --- labels and splits ------------------------------------------------------------------------------


def finish_sample(
    report: ReadReport,
    sample_id: str,
    text: str | None,
    image: ImageSource | None,
    label: int,
    label_names: tuple[str, ...],
    meta: Mapping[str, Any] | None = None,
) -> Sample | None:
    """Build a sample, or drop it (counted) when neither modality arrived."""
    if text is None and image is None:
        report.dropped_no_modality += 1
        report.problem(f"{sample_id}: neither text nor image usable, dropped")
        return None
    report.kept += 1
    return Sample(sample_id, text, image, label, label_names, meta=dict(meta or {}))


def read_post_files(
    data_dir: Path, sample_id: str, label: int, label_names: tuple[str, ...], report: ReadReport
) -> Sample | None:
    """A sample from the raw releases' ``<data_dir>/<id>.txt`` + ``<id>.jpg`` (MVSA and TumEmo)."""
    text = read_text_file(data_dir / f"{sample_id}.txt", report)
    image = checked_image(data_dir / f"{sample_id}.jpg", report, f"{data_dir.name}/{sample_id}.jpg")
    return finish_sample(report, sample_id, text, image, label, label_names)


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` that sum exactly to ``total``."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for k in sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])[: total - sum(counts)]:
        counts[k] += 1
    return counts


def _cell_counts(label_sizes: list[int], split_sizes: list[int], fractions: list[float]) -> list[list[int]]:
    """How many of each label go to each split, matching both the per-label and the per-split totals.

    Each cell starts at the floor of its exact share; the leftover units go first to the cells with
    the largest fractional parts, then to any cell whose label and split still have room.
    """
    exact = [[n * f / sum(fractions) for f in fractions] for n in label_sizes]
    cells = [[int(x) for x in row] for row in exact]
    label_left = [n - sum(row) for n, row in zip(label_sizes, cells, strict=True)]
    split_left = [t - sum(row[s] for row in cells) for s, t in enumerate(split_sizes)]
    by_fraction = sorted(
        ((g, s) for g in range(len(cells)) for s in range(len(fractions))),
        key=lambda ls: cells[ls[0]][ls[1]] - exact[ls[0]][ls[1]],
    )
    for g, s in by_fraction:  # at most one extra unit per cell, largest fractional part first
        if label_left[g] > 0 and split_left[s] > 0:
            cells[g][s] += 1
            label_left[g] -= 1
            split_left[s] -= 1
    for g, row in enumerate(cells):  # whatever is left: both sides' totals are equal, so this completes
        for s in range(len(row)):
            extra = min(label_left[g], split_left[s])
            row[s] += extra
            label_left[g] -= extra
            split_left[s] -= extra
    return cells


def stratified_split(
    samples: Sequence[Sample],
    fractions: Mapping[str, float],
    seed: int,
) -> dict[str, list[Sample]]:
    """Deterministic split: every split gets its fraction of the samples and of every label.

    Within a split the samples keep their input order, so a split is reproducible and diffable.
    """
    weights = list(fractions.values())
    if not weights or sum(weights) <= 0 or any(f < 0 for f in weights):
        raise ValueError(f"split fractions must be non-negative and sum > 0, got {dict(fractions)}")
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_label.setdefault(sample.label, []).append(index)
    labels = sorted(by_label)
    split_sizes = _largest_remainder(len(samples), weights)
    cells = _cell_counts([len(by_label[g]) for g in labels], split_sizes, weights)
    assigned: dict[str, list[int]] = {name: [] for name in fractions}
    for label, counts in zip(labels, cells, strict=True):
        indices = by_label[label]
        order = rng.permutation(len(indices))
        start = 0
        for name, count in zip(fractions, counts, strict=True):
            assigned[name].extend(indices[j] for j in order[start : start + count])
            start += count
    return {name: [samples[i] for i in sorted(idx)] for name, idx in assigned.items()}


def label_index(value: object, label_names: Sequence[str]) -> int | None:
    """A label given as a name (any case) or an index, or None if it is not one of ``label_names``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(label_names) else None
    if isinstance(value, str):
        lowered = value.strip().lower()
        names = [n.lower() for n in label_names]
        if lowered in names:
            return names.index(lowered)
        if lowered.isdigit():
            return label_index(int(lowered), label_names)
    return None
