"""Reader for the "10-fold-1" split layout published with CLMLF and PACL.

``<name>/10-fold-1/{train,dev,test}.json`` are JSON lists of ``{"id", "text", "emotion_label"}``;
the images are ``<name>/dataset_image/<id>.jpg``. Reading these files reproduces the published splits
exactly, which is what makes results comparable to the papers'.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.data.records import (
    SENTIMENT_LABELS,
    SPLITS,
    TUMEMO_LABELS,
    DataFormatError,
    Dataset,
    ReadReport,
    Sample,
    checked_image,
    finish_sample,
    label_index,
)


def label_names_for(dataset_dir: Path) -> tuple[str, ...]:
    """TumEmo's 7 emotions if the data set's folder says TumEmo, else the MVSA sentiment order."""
    return TUMEMO_LABELS if "tumemo" in dataset_dir.name.lower() else SENTIMENT_LABELS


def read_tenfold(fold_dir: str | Path, label_names: tuple[str, ...] | None = None) -> Dataset:
    """Read ``.../<name>/10-fold-1``; rows with a bad label or no usable modality are counted, not raised."""
    fold_dir = Path(fold_dir)
    dataset_dir = fold_dir.parent
    names = label_names or label_names_for(dataset_dir)
    missing = [s for s in SPLITS if not (fold_dir / f"{s}.json").is_file()]
    if missing:
        raise DataFormatError(f"tenfold: {fold_dir} lacks {', '.join(s + '.json' for s in missing)}")
    report = ReadReport(source=f"tenfold:{fold_dir}")
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        path = fold_dir / f"{split}.json"
        try:
            rows = json.loads(path.read_bytes())
        except ValueError as exc:
            raise DataFormatError(f"tenfold: {path} is not JSON: {exc}") from exc
        if not isinstance(rows, list):
            raise DataFormatError(f"tenfold: {path} holds a {type(rows).__name__}, expected a JSON list")
        splits[split] = []
        for position, row in enumerate(rows):
            report.rows += 1
            where = f"{split}.json[{position}]"
            label = label_index(row.get("emotion_label"), names) if isinstance(row, dict) else None
            if label is None or not isinstance(row.get("id"), (str, int)):
                report.rows_malformed += 1
                report.problem(f"{where}: needs an id and an emotion_label in 0..{len(names) - 1}")
                continue
            sample_id = str(row["id"])
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                report.texts_missing += 1
                text = None
            image = checked_image(dataset_dir / "dataset_image" / f"{sample_id}.jpg", report, where)
            sample = finish_sample(report, sample_id, text, image, label, names)
            if sample is not None:
                splits[split].append(sample)
    return Dataset(f"tenfold:{dataset_dir.name}", names, splits, report)
