"""What a checkpoint was trained on, in its header: data spec, split sizes and label counts, dev and test accuracy.

``postsense train`` and the demo model write it (``save_checkpoint(..., training=record)``); ``serve``, ``score``
and ``postsense config`` read it from the header (``core.checkpoint.read_header``), say it at start, and warn
when the model is the VADER demo set's.  Checkpoints written before it have none: "training data: unknown".
Serving code may import this module: it loads nothing of the trainer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.data.records import Sample

#: Most characters of the data spec kept (a spec is a name and a path; the header is at most 4 KiB).
MAX_SPEC_CHARS = 512

#: The data-set name of the VADER demo set (``vader`` or ``vader:DIR``): real tweets with *generated* images.
DEMO_DATA = "vader"

SPLIT_ORDER = ("train", "dev", "test")

DEMO_WARNING = (
    "this is a demo model, trained on the VADER demo set (tweets paired with generated images): on real posts it "
    "scores worse than always answering the majority class. Train one on your own labelled posts with "
    "`postsense train --data jsonl:PATH --out model.ckpt` (PATH: a JSONL file of posts with their `label`, or a "
    "directory of train/dev/test.jsonl; other data sets: `postsense train --help`) and set model.checkpoint to it"
)


def _accuracy(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 2)


def training_record(
    data: str,
    splits: Mapping[str, Sequence[Sample]],
    dev_accuracy: float | None,
    test_accuracy: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record of a run on ``data`` (the spec given to ``--data``); accuracies in %, None: not measured."""
    sizes = {name: len(samples) for name, samples in splits.items()}
    labels = {
        name: dict(sorted(Counter(s.label_name for s in samples).items())) for name, samples in splits.items()
    }
    record: dict[str, Any] = {
        "data": data[:MAX_SPEC_CHARS],
        "sizes": sizes,
        "labels": labels,
        "dev_accuracy": _accuracy(dev_accuracy),
        "test_accuracy": _accuracy(test_accuracy),
    }
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def is_demo(record: Mapping[str, Any] | None) -> bool:
    """Whether the record says the model was trained on the VADER demo set."""
    if not record or not isinstance(record.get("data"), str):
        return False
    return record["data"].split(":", 1)[0].strip().lower() == DEMO_DATA


def describe(record: Mapping[str, Any] | None) -> str:
    """One line: ``training data: vader:data (train 1200, dev 300); dev accuracy 81.3 %, test not measured``."""
    if not record or not isinstance(record.get("data"), str):
        return "training data: unknown (the checkpoint has no training record)"
    sizes = record.get("sizes") or {}
    order = sorted(sizes, key=lambda name: (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else 3, name))
    split_text = ", ".join(f"{name} {sizes[name]}" for name in order)
    parts = [f"training data: {record['data']}" + (f" ({split_text})" if split_text else "")]
    disruption = record.get("modality_random")
    if isinstance(disruption, Mapping):
        parts[0] += f", modality-random training {disruption.get('dr')} {disruption.get('setting')}"
    regime = record.get("regime")
    if isinstance(regime, Mapping):
        parts[0] += f", {regime.get('regime')} regime (intact {regime.get('intact')})"
    scores = []
    for split in ("dev", "test"):
        value = record.get(f"{split}_accuracy")
        scores.append(
            f"{split} accuracy {value:.1f} %" if isinstance(value, int | float) else f"{split} not measured"
        )
    return "; ".join([*parts, ", ".join(scores)])


def read_training(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's training record from its header (None: not recorded); raises CheckpointError."""
    from core.checkpoint import read_header

    record = read_header(path).get("training")
    return record if isinstance(record, dict) else None
