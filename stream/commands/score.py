"""Score posts from a file or a directory without Kafka (backfills, audits, shadow tests of a new checkpoint).

IN is a JSONL file of posts in the input contract, or a directory of ``<id>.jpg`` (or .jpeg/.png/.gif/.webp/.bmp)
and ``<id>.txt`` pairs (either file may be absent: that modality is then missing). A text file is read as UTF-8,
else as GBK or cp1252 (as the data set readers read tweets); one in none of these is an undecodable text, and
the post is scored on its image (the summary counts both kinds). OUT receives one sentiment record per post,
the same document ``serve`` publishes (core/schemas/sentiment.v1.json); its ``source`` is the input file
(``topic``), 0 (``partition``) and the line number from 1 (``offset``; 0 for a directory's files). Records
that are not posts go to ``OUT.rejected.jsonl`` with the dead-letter reason and the original line. Batching
and decoding are the serve path's (``stream.processor.BatchProcessor``); quality is scored against the
checkpoint's reference queues (Redis is not contacted), as a ``serve`` pinned to them (``redis.pin_to_checkpoint``)
does: then both give the same labels and probabilities on the same posts.

Interrupted? Run the same command again: lines already in OUT or in the rejected file are skipped, a torn
last line is cut off. ``--compare CHECKPOINT`` scores every post with a second model too (the shadow test):
each record gets ``shadow`` (that model's label, and whether it agrees) and the summary the agreement rate.
The summary (also written to ``OUT.summary.json``) counts in = out + rejected + skipped (already done).
Exit codes: 0 done, 2 unreadable input or model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from core.contracts import dumps_strict
from stream.offline import score
from stream.settings import Settings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_INPUT = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", type=Path, metavar="IN", help="a JSONL file of posts, or a directory of <id>.jpg + <id>.txt"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="JSONL file of sentiment records (appended to on resume)"
    )
    parser.add_argument(
        "--compare", type=Path, metavar="CHECKPOINT", help="a second model to score every post with"
    )
    parser.add_argument("--batch-size", type=int, help="posts per batch (default: batch.max_posts)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from core.checkpoint import CheckpointError
    from stream.components import announce_training, load_predictor

    source = args.input
    if not source.exists():
        log.error("no such input: %s", source)
        return EXIT_INPUT
    checkpoint = settings.model.checkpoint
    if checkpoint is None:
        log.error("no model: set model.checkpoint (--checkpoint PATH or POSTSENSE_MODEL__CHECKPOINT)")
        return EXIT_INPUT
    # Relative image paths are read from the input's own directory unless media.local_root says otherwise.
    root = source if source.is_dir() else settings.media.local_root or source.resolve().parent
    settings = settings.model_copy(update={"media": settings.media.model_copy(update={"local_root": root})})
    try:
        predictor = load_predictor(settings, checkpoint)
        shadow = load_predictor(settings, args.compare) if args.compare else None
    except (CheckpointError, OSError, ValueError) as exc:
        log.error("cannot load the model: %s", exc)
        return EXIT_INPUT
    for path in (checkpoint, args.compare) if args.compare else (checkpoint,):
        announce_training(path)
    summary = score(
        source, args.out, settings, predictor, shadow, args.batch_size or settings.batch.max_posts
    )
    print(dumps_strict(summary.document()))
    return EXIT_OK
