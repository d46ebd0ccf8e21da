"""Reader for JSONL files of posts in the service's own input schema, plus a ``label``.

Each line is a post as the service consumes it from Kafka (``core/schemas/post.v1.json``: id, text,
image as ``{"base64"}``, ``{"url"}`` or ``{"path"}``, created_at, metadata) with one extra field,
``label`` (a label name or index). Training on exactly the schema the service serves keeps the two
from drifting apart; each post is validated by the service's own :func:`core.contracts.parse_post`.

``jsonl:PATH`` is a directory holding ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl``, or a single
file that is split 70/15/15, stratified and seeded. Relative image paths are resolved against the
file's folder. Remote ``url`` images are not fetched by a reader: they count as ``images_remote``.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from core.contracts import Invalid, parse_post
from core.data.records import (
    SENTIMENT_LABELS,
    SPLITS,
    DataFormatError,
    Dataset,
    ReadReport,
    Sample,
    checked_image,
    finish_sample,
    label_index,
    stratified_split,
)

SINGLE_FILE_SPLIT = {"train": 0.7, "dev": 0.15, "test": 0.15}


def _image_source(
    image: dict[str, str] | None, base: Path, report: ReadReport, where: str
) -> Path | bytes | None:
    """Turn the post's image field into a decodable path or bytes, or None (counted)."""
    if image is None:
        return checked_image(None, report, where)
    if "base64" in image:
        try:
            data = base64.b64decode(image["base64"], validate=True)
        except (binascii.Error, ValueError):
            report.images_undecodable += 1
            report.problem(f"{where}: image base64 is not valid base64")
            return None
        return checked_image(data, report, where)
    if "path" in image:
        return checked_image(base / image["path"], report, f"{where}: {image['path']}")
    url = urlparse(image["url"])
    if url.scheme == "file":
        return checked_image(Path(unquote(url.path)), report, f"{where}: {image['url']}")
    report.images_remote += 1
    report.problem(f"{where}: remote image {image['url'][:80]} not fetched by the reader")
    return None


def read_jsonl_file(path: Path, label_names: tuple[str, ...], report: ReadReport) -> list[Sample]:
    """Samples of one JSONL file; bad lines are counted with their line numbers, never raised."""
    samples: list[Sample] = []
    with path.open("rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            report.rows += 1
            where = f"{path.name}:{line_no}"
            sample = _read_line(raw, path.parent, label_names, report, where)
            if sample is not None:
                samples.append(sample)
    return samples


def _read_line(
    raw: bytes, base: Path, label_names: tuple[str, ...], report: ReadReport, where: str
) -> Sample | None:
    try:
        doc: Any = json.loads(raw)
    except ValueError as exc:
        report.rows_malformed += 1
        report.problem(f"{where}: not JSON ({exc})")
        return None
    label = label_index(doc.pop("label", None), label_names) if isinstance(doc, dict) else None
    if label is None:
        report.rows_malformed += 1
        report.problem(f"{where}: needs a 'label' that is one of {label_names} or an index into them")
        return None
    post = parse_post(json.dumps(doc).encode())
    if isinstance(post, Invalid):
        report.rows_malformed += 1
        report.problem(f"{where}: not a valid post ({post.reason}: {post.detail})")
        return None
    text = post.text if post.text and post.text.strip() else None
    if text is None:
        report.texts_missing += 1
    image = _image_source(post.image, base, report, where)
    return finish_sample(report, post.id, text, image, label, label_names, post.metadata)


def read_jsonl(path: str | Path, label_names: tuple[str, ...] = SENTIMENT_LABELS, seed: int = 0) -> Dataset:
    """Read ``{train,dev,test}.jsonl`` from a directory, or split one file 70/15/15."""
    path = Path(path)
    report = ReadReport(source=f"jsonl:{path}")
    if path.is_dir():
        missing = [s for s in SPLITS if not (path / f"{s}.jsonl").is_file()]
        if missing:
            raise DataFormatError(f"jsonl: {path} lacks {', '.join(s + '.jsonl' for s in missing)}")
        splits = {s: read_jsonl_file(path / f"{s}.jsonl", label_names, report) for s in SPLITS}
    elif path.is_file():
        splits = stratified_split(read_jsonl_file(path, label_names, report), SINGLE_FILE_SPLIT, seed)
    else:
        raise DataFormatError(f"jsonl: {path} does not exist")
    return Dataset(f"jsonl:{path.name}", label_names, splits, report)
