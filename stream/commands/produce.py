"""Send posts to a topic: from a data set (optionally disrupted as in the paper's section 4.1) or a JSONL file.

For the demo, tests and benchmarks. ``--dataset`` turns labelled samples into input posts (image as
base64, the label and disruption in ``metadata``, ``created_at`` stamped at send time so the service's
end-to-end latency is real); ``--jsonl`` sends each line verbatim, invalid ones included (to exercise
the dead-letter path). Every send is checked; the exit code is 1 if any record was not acknowledged.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from connectors.kafka import ensure_topics
from stream.feed import dataset_records, jsonl_records, limited, send
from stream.settings import Settings

log = logging.getLogger("stream.commands.produce")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset", metavar="SPEC", help="a data set: vader[:DIR], jsonl:PATH, mvsa-single:DIR, ..."
    )
    source.add_argument("--jsonl", type=Path, metavar="PATH", help="send each line of this file verbatim")
    parser.add_argument("--split", default="test", help="data set split to send (default: test)")
    parser.add_argument("--topic", help="target topic (default: kafka.input_topic)")
    parser.add_argument("--limit", type=int, help="send at most this many records")
    parser.add_argument("--rate", type=float, default=0.0, help="records per second (0: as fast as possible)")
    parser.add_argument(
        "--disrupt", choices=["C", "D", "C+D"], help="apply the disruption protocol in this setting"
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--dr", type=float, help="modality-random: disrupt a random modality of this share of posts"
    )
    how.add_argument(
        "--modality", choices=["image", "text"], help="modality-fixed: disrupt this modality of every post"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--create-topics", type=int, metavar="PARTITIONS", help="create the topic if absent")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit is not None and args.limit < 0:
        log.error("--limit must be >= 0")
        return 2
    if args.rate < 0:
        log.error("--rate must be >= 0")
        return 2
    topic = args.topic or settings.kafka.input_topic
    try:
        records = (
            jsonl_records(args.jsonl)
            if args.jsonl
            else dataset_records(args.dataset, args.split, args.seed, args.disrupt, args.dr, args.modality)
        )
        records = limited(records, args.limit)
        if args.create_topics:
            ensure_topics(settings.kafka, [topic], partitions=args.create_topics)
        report = send(settings, topic, records, rate=args.rate)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(report.line())
    return 1 if report.failed else 0
