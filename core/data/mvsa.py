"""Readers for the raw MVSA-Single and MVSA-Multiple releases, with the standard label merge.

On disk: ``data/<id>.jpg`` and ``data/<id>.txt`` (one tweet, raw bytes, often not UTF-8) and
``labelResultAll.txt`` (a header line, then ``ID<TAB>text,image`` for Single or three
``text,image`` columns, one per annotator, for Multiple).

The merge follows Xu & Mao, as the paper does: a text label and an image label that agree give that
label; if one is neutral the other wins; positive against negative drops the pair. For Multiple each
modality first takes its majority (at least 2 of 3 annotators), and a modality without one drops the
pair. The raw release has no split; :func:`read_mvsa` makes the paper's 8:1:1 split, stratified.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from core.data.records import (
    SENTIMENT_LABELS,
    DataFormatError,
    Dataset,
    ReadReport,
    Sample,
    read_post_files,
    stratified_split,
)

LABEL_FILE = "labelResultAll.txt"
PAPER_SPLIT = {"train": 0.8, "dev": 0.1, "test": 0.1}


def merge_pair(text_label: str, image_label: str) -> tuple[str | None, str]:
    """Xu & Mao's rule for one text/image label pair: (merged label or None if dropped, rule name)."""
    if text_label == image_label:
        return text_label, "agree"
    if "neutral" in (text_label, image_label):
        return (image_label if text_label == "neutral" else text_label), "one_neutral"
    return None, "conflict_dropped"


def majority(labels: list[str]) -> str | None:
    """The label at least 2 of the 3 annotators gave, else None."""
    label, count = Counter(labels).most_common(1)[0]
    return label if count >= 2 else None


def _parse_pair(field: str) -> tuple[str, str]:
    text_label, image_label = (part.strip().lower() for part in field.split(","))
    if text_label not in SENTIMENT_LABELS or image_label not in SENTIMENT_LABELS:
        raise ValueError(f"unknown label in {field!r}")
    return text_label, image_label


def _merged_label(fields: list[str], multiple: bool, report: ReadReport) -> str | None:
    """Majority per modality (Multiple only), then the pair merge; counts the rule used."""
    pairs = [_parse_pair(f) for f in fields]
    if multiple:
        text_label = majority([t for t, _ in pairs])
        image_label = majority([i for _, i in pairs])
        if text_label is None or image_label is None:
            report.merge["no_majority_dropped"] += 1
            return None
    else:
        text_label, image_label = pairs[0]
    label, rule = merge_pair(text_label, image_label)
    report.merge[rule] += 1
    return label


def read_mvsa(root: str | Path, multiple: bool, seed: int = 0) -> Dataset:
    """Read a raw MVSA release under ``root``; bad rows are counted in the report, never raised."""
    root = Path(root)
    name = "mvsa-multiple" if multiple else "mvsa-single"
    label_file = root / LABEL_FILE
    if not label_file.is_file():
        raise DataFormatError(f"{name}: no {LABEL_FILE} in {root} (expected the raw release layout)")
    report = ReadReport(source=f"{name}:{root}")
    expected_fields = 4 if multiple else 2
    samples: list[Sample] = []
    lines = label_file.read_bytes().decode("utf-8", errors="replace").splitlines()
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        report.rows += 1
        fields = line.strip().split("\t")
        try:
            if len(fields) != expected_fields:
                raise ValueError(f"{len(fields)} tab-separated fields, expected {expected_fields}")
            label = _merged_label(fields[1:], multiple, report)
        except ValueError as exc:
            report.rows_malformed += 1
            report.problem(f"{LABEL_FILE}:{line_no}: {exc}")
            continue
        if label is None:
            continue
        sample_id = fields[0].strip()
        sample = read_post_files(
            root / "data", sample_id, SENTIMENT_LABELS.index(label), SENTIMENT_LABELS, report
        )
        if sample is not None:
            samples.append(sample)
    return Dataset(name, SENTIMENT_LABELS, stratified_split(samples, PAPER_SPLIT, seed), report)
