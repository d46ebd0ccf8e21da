"""Reader for the raw TumEmo release (Yang et al.): 7 emotions of Tumblr image-text posts.

On disk: ``all_data_id_and_label.txt`` (a header line, then ``<id> <Emotion>`` per line, the emotion
capitalised, e.g. ``Happy``) and ``data/<id>.txt`` / ``data/<id>.jpg``. The release has no split;
like the paper (156,217 / 19,524 / 19,524) we make an 8:1:1 split, stratified and seeded.
"""

from __future__ import annotations

from pathlib import Path

from core.data.mvsa import PAPER_SPLIT
from core.data.records import (
    TUMEMO_LABELS,
    DataFormatError,
    Dataset,
    ReadReport,
    Sample,
    label_index,
    read_post_files,
    stratified_split,
)

LABEL_FILE = "all_data_id_and_label.txt"


def read_tumemo(root: str | Path, seed: int = 0) -> Dataset:
    """Read a raw TumEmo release under ``root``; bad rows are counted in the report, never raised."""
    root = Path(root)
    label_file = root / LABEL_FILE
    if not label_file.is_file():
        raise DataFormatError(f"tumemo: no {LABEL_FILE} in {root} (expected the raw release layout)")
    report = ReadReport(source=f"tumemo:{root}")
    samples: list[Sample] = []
    lines = label_file.read_bytes().decode("utf-8", errors="replace").splitlines()
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        report.rows += 1
        label = label_index(fields[1], TUMEMO_LABELS) if len(fields) == 2 else None
        if label is None:
            report.rows_malformed += 1
            report.problem(f"{LABEL_FILE}:{line_no}: expected '<id> <emotion>' with one of {TUMEMO_LABELS}")
            continue
        sample_id = fields[0]
        sample = read_post_files(root / "data", sample_id, label, TUMEMO_LABELS, report)
        if sample is not None:
            samples.append(sample)
    return Dataset("tumemo", TUMEMO_LABELS, stratified_split(samples, PAPER_SPLIT, seed), report)
