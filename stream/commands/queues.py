"""Administer the shared reference queues in Redis: seed, inspect, snapshot, reset.

  seed       write the checkpoint's queues (or a snapshot's) to Redis; --overwrite replaces live queues
  inspect    length, version, statistics and drift from the checkpoint, per modality (--json for machines)
  snapshot   save the live queues and the checkpoint reference to a .npz file (seed --snapshot restores it)
  reset      return the live queues to the checkpoint's (the reference stored at seed time)

The queues are per model version: it comes from --model-version, else from the checkpoint (model.checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

from connectors.queue_store import QueueState, QueueStore, ReferenceQueueError
from connectors.reference_queues import checkpoint_reference, connect, drift_sigmas
from core.contracts import MODALITIES
from core.drf import queue_statistics
from stream.settings import Settings

SNAPSHOT_FORMAT = "postsense-reference-queues/1"


class CommandError(RuntimeError):
    """A problem the operator can fix; printed without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=["seed", "inspect", "snapshot", "reset"])
    parser.add_argument("--model-version", help="queues of this model version (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="seed: replace queues that already exist")
    parser.add_argument("--snapshot", type=Path, metavar="FILE", help="seed: restore this snapshot file")
    parser.add_argument("--out", type=Path, metavar="FILE", help="snapshot: file to write (.npz)")
    parser.add_argument("--json", action="store_true", help="inspect: print JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return ACTIONS[args.action](args, settings)
    except (CommandError, ReferenceQueueError, ValueError) as exc:
        print(f"postsense queues {args.action}: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(
            f"postsense queues {args.action}: Redis at {settings.redis.redacted_url()}: {exc}",
            file=sys.stderr,
        )
        return 1


def _store(settings: Settings, model_version: str) -> QueueStore:
    return QueueStore(connect(settings.redis), settings.redis.key_prefix, model_version)


def _checkpoint(settings: Settings) -> Any:
    from core.checkpoint import CheckpointError
    from core.inference import Predictor

    if settings.model.checkpoint is None:
        raise CommandError("no checkpoint: set model.checkpoint (--checkpoint) or pass --model-version")
    try:
        return Predictor.from_checkpoint(settings.model.checkpoint, "cpu")
    except CheckpointError as exc:
        raise CommandError(str(exc)) from None


def _model_version(args: argparse.Namespace, settings: Settings) -> str:
    return args.model_version or _checkpoint(settings).model_version


def _seeded(store: QueueStore, contents: bool = False) -> dict[str, QueueState]:
    states = store.read(contents=contents)
    if states is None:
        raise CommandError(f"no reference queues under {store.base}: run `postsense queues seed` first")
    return states


def seed(args: argparse.Namespace, settings: Settings) -> int:
    if args.snapshot is not None:
        snapshot = read_snapshot(args.snapshot)
        version = args.model_version or snapshot["model_version"]
        if version != snapshot["model_version"]:
            raise CommandError(
                f"{args.snapshot} holds queues of model version {snapshot['model_version']}, not {version}"
            )
        queues, reference, capacity = snapshot["features"], snapshot["reference"], snapshot["capacity"]
        source = f"snapshot {args.snapshot}"
    else:
        predictor = _checkpoint(settings)
        if args.model_version and args.model_version != predictor.model_version:
            raise CommandError(
                f"the checkpoint is model version {predictor.model_version}, not {args.model_version}"
            )
        version = predictor.model_version
        queues, capacity = checkpoint_reference(predictor)
        reference, source = None, f"checkpoint {settings.model.checkpoint}"
    store = _store(settings, version)
    if not store.seed(queues, capacity, reference=reference, overwrite=args.overwrite, source=source):
        print(
            f"reference queues under {store.base} already exist; nothing written (--overwrite replaces them)"
        )
        return 0
    lengths = ", ".join(f"{m} {len(queues[m])}/{capacity[m]}" for m in MODALITIES)
    print(f"seeded {store.base} from {source}: {lengths}")
    return 0


def describe(states: dict[str, QueueState]) -> dict[str, dict[str, Any]]:
    """Per modality: what inspect prints.  Live statistics are recomputed here when the stored ones are stale."""
    out = {}
    for m, state in states.items():
        assert state.features is not None and state.reference_features is not None  # read with contents=True
        live = state.stats or queue_statistics(torch.from_numpy(state.features), state.capacity)
        out[m] = {
            "length": state.length,
            "capacity": state.capacity,
            "dim": state.dim,
            "version": state.version,
            "generation": state.generation,
            "stored_stats_current": state.stats is not None,
            "sigma": float(live.sigma),
            "threshold": float(live.threshold),
            "checkpoint_sigma": float(state.reference.sigma),
            "checkpoint_threshold": float(state.reference.threshold),
            "drift_sigmas": drift_sigmas(live, state.reference),
            "changed_since_checkpoint": not np.array_equal(state.features, state.reference_features),
        }
    return out


def inspect(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings, _model_version(args, settings))
    report = describe(_seeded(store, contents=True))
    if args.json:
        print(json.dumps({"key": store.base, "modalities": report}, indent=2))
        return 0
    print(f"reference queues {store.base}")
    print(
        f"{'modality':<9}{'length':>12}{'version':>9}{'sigma':>11}{'threshold':>11}{'drift (σ)':>11}  stats"
    )
    for m, row in report.items():
        stored = "stored" if row["stored_stats_current"] else "stale (recomputed)"
        print(
            f"{m:<9}{row['length']:>7}/{row['capacity']:<4}{row['version']:>9}{row['sigma']:>11.4g}"
            f"{row['threshold']:>11.4g}{row['drift_sigmas']:>11.4g}  {stored}"
        )
    return 0


def snapshot(args: argparse.Namespace, settings: Settings) -> int:
    if args.out is None:
        raise CommandError("snapshot needs --out FILE")
    version = _model_version(args, settings)
    states = _seeded(_store(settings, version), contents=True)
    write_snapshot(args.out, version, states)
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{m} {s.length}/{s.capacity} (version {s.version})" for m, s in states.items())
    )
    return 0


def reset(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings, _model_version(args, settings))
    generations = store.reset()
    print(f"reset {store.base} to the checkpoint queues (generation {max(generations.values())})")
    return 0


def write_snapshot(path: Path, model_version: str, states: dict[str, QueueState]) -> None:
    """Live contents and the checkpoint reference of every modality, with their versions, in one .npz file."""
    meta = {
        "format": SNAPSHOT_FORMAT,
        "model_version": model_version,
        "modalities": {
            m: {"capacity": s.capacity, "version": s.version, "generation": s.generation}
            for m, s in states.items()
        },
    }
    arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta))}
    for m, s in states.items():
        arrays[f"features_{m}"], arrays[f"reference_{m}"] = s.features, s.reference_features
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # np.savez on a path would append ".npz" to other names
        np.savez(handle, **arrays)


def read_snapshot(path: Path) -> dict[str, Any]:
    """The contents of a snapshot file; CommandError if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise CommandError(f"{path} is not a reference-queue snapshot ({meta.get('format')!r})")
            return {
                "model_version": str(meta["model_version"]),
                "capacity": {m: int(meta["modalities"][m]["capacity"]) for m in MODALITIES},
                "features": {m: data[f"features_{m}"] for m in MODALITIES},
                "reference": {m: data[f"reference_{m}"] for m in MODALITIES},
            }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"cannot read snapshot {path}: {exc}") from None


ACTIONS = {"seed": seed, "inspect": inspect, "snapshot": snapshot, "reset": reset}
