"""Scoring a JSONL file or a directory of posts without Kafka: the library behind ``postsense score``.

The serve path's batching and decoding (``stream.processor.BatchProcessor``), the checkpoint's reference
statistics (Redis is not contacted), resumable output; the command's help (``stream/commands/score.py``)
says what a user gets.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from core.contracts import DeadLetter, Invalid, ModalityState, Post, dumps_strict
from core.data import decode_text
from stream.processor import BatchProcessor, DecodedPost, Record, decode_pool, torch_threads, validate
from stream.settings import Settings

if TYPE_CHECKING:
    from core.inference import Predictor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")

#: The text state's reason for a directory's ``<id>.txt`` that no encoding of ``core.data.decode_text`` decodes.
UNKNOWN_ENCODING = "unknown_encoding"


@dataclass(frozen=True)
class Entry:
    """One input record; ``why`` it cannot be a post, if so; what became of a directory post's text file."""

    record: Record
    why: Invalid | None = None
    #: The encoding that decoded ``<id>.txt`` (None: no text file, or a JSONL line).
    text_encoding: str | None = None
    #: ``<id>.txt`` is in no encoding ``decode_text`` knows: the post's text is undecodable.
    text_undecodable: bool = False


@dataclass
class Summary:
    """What a run did. ``posts_in`` counts every input record; each ends in exactly one other count."""

    input: str
    posts_in: int = 0
    scored: int = 0
    rejected: int = 0
    skipped_done: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    texts_repaired: int = 0  # directory texts that were not UTF-8 but GBK or cp1252 (decoded, scored)
    texts_undecodable: int = 0  # directory texts in no known encoding (text undecodable; scored on the image)
    compared: int = 0
    agreed: int = 0
    seconds: float = 0.0

    def document(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc["posts_per_s"] = round(self.scored / self.seconds, 2) if self.seconds else None
        doc["agreement"] = round(self.agreed / self.compared, 4) if self.compared else None
        return doc


def score(
    source: Path,
    out: Path,
    settings: Settings,
    predictor: Predictor,
    shadow: Predictor | None = None,
    batch_size: int = 32,
) -> Summary:
    """Score every record of ``source`` not already answered in ``out``; returns (and writes) the summary."""
    from connectors.metrics import Metrics
    from core.progress import progress

    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    done = _answered(out) | _answered(rejected_path)
    processor = BatchProcessor(settings, predictor, Metrics())
    second = BatchProcessor(settings, shadow, Metrics()) if shadow is not None else None
    # The shadow model reuses the decoded pixels unless its image encoder preprocesses differently.
    redecode = shadow is not None and (
        shadow.model.image_encoder.preprocessing != predictor.model.image_encoder.preprocessing
    )
    summary = Summary(input=str(source))
    started = time.monotonic()
    threads = torch_threads()  # the model runs on this thread, at its count, beside single-threaded decoding
    records = _records(source)
    total = _count(source)
    with (
        open(out, "a", encoding="utf-8") as out_fh,
        open(rejected_path, "a", encoding="utf-8") as rejected_fh,
        decode_pool(settings.batch.decode_workers) as pool,
        progress(total=total, desc="score", unit="post") as bar,
    ):
        for batch in _batches(records, batch_size):
            summary.posts_in += len(batch)
            todo = [e for e in batch if (e.record.topic, e.record.offset) not in done]
            summary.skipped_done += len(batch) - len(todo)
            valid: list[tuple[Entry, Post]] = []
            for entry in todo:
                parsed = entry.why or validate(entry.record, processor.limits)
                if isinstance(parsed, Invalid):
                    _reject(rejected_fh, entry.record, parsed, summary)
                else:
                    valid.append((entry, parsed))
            if valid:
                decoded = list(pool.map(lambda ep: _decode(processor, *ep), valid))
                documents = processor.process(decoded, []).documents
                if second is not None:
                    shadow_posts = (
                        list(pool.map(lambda ep: _decode(second, *ep), valid)) if redecode else decoded
                    )
                    _compare(second, shadow_posts, documents, summary)
                for doc in documents:
                    out_fh.write(dumps_strict(doc) + "\n")
                summary.scored += len(documents)
                summary.texts_repaired += sum(e.text_encoding not in (None, "utf-8") for e, _ in valid)
                summary.texts_undecodable += sum(e.text_undecodable for e, _ in valid)
            out_fh.flush()
            rejected_fh.flush()
            os.fsync(out_fh.fileno())  # a resumed run trusts what it finds in OUT
            bar.update(len(batch))
    torch_threads(threads)  # torch's default for new threads, as it was
    summary.seconds = round(time.monotonic() - started, 3)
    out.with_name(out.name + ".summary.json").write_text(dumps_strict(summary.document(), indent=2) + "\n")
    return summary


def _decode(processor: BatchProcessor, entry: Entry, post: Post) -> DecodedPost:
    """The serve path's decoding; a text file no known encoding decodes makes the text undecodable."""
    decoded = processor.decode(entry.record, post)
    if entry.text_undecodable:
        decoded.text = None
        decoded.text_state, decoded.text_reason = ModalityState.undecodable, UNKNOWN_ENCODING
    return decoded


def _compare(
    second: BatchProcessor, posts: list[DecodedPost], documents: list[dict[str, Any]], summary: Summary
) -> None:
    """Add the shadow model's label, and whether it agrees, to each document."""
    prediction = second.infer(posts)
    model = {"name": second.predictor.model_name, "version": second.predictor.model_version}
    for doc, label in zip(documents, prediction.labels, strict=True):
        agrees = label == doc["label"]
        doc["shadow"] = {"model": model, "label": label, "agrees": agrees}
        summary.compared += 1
        summary.agreed += int(agrees)


def _reject(fh: TextIO, record: Record, why: Invalid, summary: Summary) -> None:
    """One line of OUT.rejected.jsonl: the dead-letter document plus the original line (as text)."""
    letter = DeadLetter(
        None,
        record.value,
        why.reason,
        why.error_class,
        why.detail,
        record.topic,
        record.partition,
        record.offset,
    )
    doc = letter.document()
    doc["value"] = None if record.value is None else record.value.decode("utf-8", errors="replace")
    fh.write(dumps_strict(doc) + "\n")
    summary.rejected += 1
    summary.rejected_reasons[why.reason] = summary.rejected_reasons.get(why.reason, 0) + 1


def _answered(path: Path) -> set[tuple[str, int]]:
    """Source coordinates already in an output file; a torn last line (an interrupted write) is cut off."""
    if not path.exists():
        return set()
    done: set[tuple[str, int]] = set()
    good = 0
    with open(path, "rb") as fh:
        for line in fh:
            try:
                source = json.loads(line)["source"]
            except (ValueError, KeyError, TypeError):
                break
            done.add((source["topic"], source["offset"]))
            good += len(line)
    if good < path.stat().st_size:
        log.warning("%s: cutting a torn last line at byte %d (interrupted write)", path, good)
        os.truncate(path, good)
    return done


def _count(source: Path) -> int:
    if source.is_dir():
        return len(_directory_ids(source))
    with open(source, "rb") as fh:
        return sum(1 for _ in fh)


def _batches(entries: Iterator[Entry], size: int) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _records(source: Path) -> Iterator[Entry]:
    """Input records with their coordinates; a directory entry that cannot become a post comes with why."""
    if source.is_dir():
        yield from _directory_records(source)
        return
    topic = str(source.resolve())
    with open(source, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            yield Entry(Record(topic, 0, number, None, line.rstrip(b"\r\n")))


def _directory_ids(directory: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix.lower() in (*IMAGE_SUFFIXES, ".txt"):
            files.setdefault(path.stem, []).append(path)
    return files


def _directory_records(directory: Path) -> Iterator[Entry]:
    """One post per id: its text file's contents and its image as a ``{"path": ...}`` under the directory.

    Text files are decoded as the data set readers decode tweets (``core.data.decode_text``: UTF-8, GBK,
    cp1252); one in none of those encodings leaves the post without a text, and its text state undecodable.
    """
    for post_id, paths in _directory_ids(directory).items():
        texts = [p for p in paths if p.suffix.lower() == ".txt"]
        images = [p for p in paths if p.suffix.lower() != ".txt"]
        topic = str((texts or images)[0].resolve())
        doc: dict[str, Any] = {"id": post_id}
        why = None
        if len(images) > 1:
            why = Invalid(
                "ambiguous_image", "ValueError", f"several images for {post_id}: {[p.name for p in images]}"
            )
        elif images:
            doc["image"] = {"path": images[0].name}
        encoding = None
        if texts:
            text, encoding = decode_text(texts[0].read_bytes())
            if encoding is not None:
                doc["text"] = text
        record = Record(topic, 0, 0, post_id.encode(), dumps_strict(doc).encode())
        yield Entry(record, why, encoding, text_undecodable=bool(texts) and encoding is None)
