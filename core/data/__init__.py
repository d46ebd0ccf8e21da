"""Data sets for training and evaluating the DRF model, and the paper's disruption protocol.

``load_dataset(spec)`` is the one entry point the CLI needs; the readers report (never raise on)
repaired text, missing or undecodable images and label-merge decisions in ``Dataset.report``.
"""

from __future__ import annotations

from pathlib import Path

from core.data.jsonl import read_jsonl
from core.data.mvsa import read_mvsa
from core.data.records import (
    SENTIMENT_LABELS,
    TUMEMO_LABELS,
    DataFormatError,
    Dataset,
    Disruption,
    ReadReport,
    Sample,
    decode_text,
    decode_tweet_bytes,
    load_image,
)
from core.data.tenfold import read_tenfold
from core.data.tumemo import read_tumemo
from core.data.vader import build_demo_set, load_vader

SPEC_HELP = "vader[:DIR], mvsa-single:DIR, mvsa-multiple:DIR, tenfold:DIR/10-fold-1, tumemo:DIR or jsonl:PATH"


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """Read the data set named by ``spec`` (see SPEC_HELP); ``seed`` fixes splits the release lacks."""
    kind, _, arg = spec.partition(":")
    if kind == "vader":
        return load_vader(arg or None, seed=seed)
    if not arg:
        raise DataFormatError(f"data set spec {spec!r} needs a path after ':'; expected one of {SPEC_HELP}")
    path = Path(arg)
    if kind in ("mvsa-single", "mvsa-multiple"):
        return read_mvsa(path, multiple=kind == "mvsa-multiple", seed=seed)
    if kind == "tenfold":
        return read_tenfold(path)
    if kind == "tumemo":
        return read_tumemo(path, seed=seed)
    if kind == "jsonl":
        return read_jsonl(path, seed=seed)
    raise DataFormatError(f"unknown data set kind {kind!r} in {spec!r}; expected one of {SPEC_HELP}")


__all__ = [
    "SENTIMENT_LABELS",
    "SPEC_HELP",
    "TUMEMO_LABELS",
    "DataFormatError",
    "Dataset",
    "Disruption",
    "ReadReport",
    "Sample",
    "build_demo_set",
    "decode_text",
    "decode_tweet_bytes",
    "load_dataset",
    "load_image",
]
