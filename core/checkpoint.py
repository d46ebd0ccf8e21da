"""One-file checkpoints of a DRFModel: weights, queues and their statistics, configuration, labels, version.

Layout: one header line ``POSTSENSE-DRF <format> <json>\\n`` (model version, payload size and SHA-256), then a
``torch.save`` payload of plain data (loaded with ``weights_only=True``, so a checkpoint cannot run code).
The checksum turns a truncated or corrupted file into a clear error instead of garbage weights.  The queues are
buffers of the model, so they and their statistics travel in the state dict.  The header may also carry
``training``, the record of what the model was trained on (data spec, split sizes and label counts, dev and test
accuracy: ``core.provenance``), readable without loading the payload; checkpoints written before it have
none and load as before ("training data: unknown").
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from core import __version__
from core.files import torch_bytes, write_atomically
from core.model.drf_model import DRFModel

MAGIC = b"POSTSENSE-DRF"
FORMAT_VERSION = 1
_MAX_HEADER = 4096


class CheckpointError(ValueError):
    """The file is not a usable postsense checkpoint (wrong kind, damaged, or incompatible with this code)."""


@dataclass
class Checkpoint:
    model: DRFModel
    model_version: str
    metadata: dict[str, Any]  # created_at, torch version, config, training (None when not recorded)


def save_checkpoint(
    model: DRFModel,
    path: str | Path,
    model_version: str | None = None,
    training: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model`` atomically to ``path``; returns the model version (default: configuration + content hash).

    ``training``: what the model was trained on (``core.provenance.training_record``), kept in the header.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "config": model.config(),
        "state_dict": state,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": str(torch.__version__), "postsense": __version__},
    }
    if model.calibration_temperature is not None:  # absent from checkpoints of uncalibrated models (T = 1)
        payload["calibration"] = {
            "method": "temperature",
            "temperature": float(model.calibration_temperature),
        }
    data = torch_bytes(payload)
    digest = hashlib.sha256(data).hexdigest()
    version = model_version or f"drf-{model.encoder_name}-{digest[:12]}"
    fields: dict[str, Any] = {"model_version": version, "sha256": digest, "bytes": len(data)}
    if training is not None:
        fields["training"] = dict(training)
    header = json.dumps(fields, sort_keys=True, allow_nan=False)
    if "\n" in header or len(header) > _MAX_HEADER:
        raise ValueError(
            f"model version or training record is too long, or the version contains a newline: {version!r}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, MAGIC + f" {FORMAT_VERSION} ".encode() + header.encode() + b"\n", data)
    return version


def _read(path: Path, size: int = -1) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def read_header(path: str | Path) -> dict[str, Any]:
    """The header (model version, payload size and SHA-256, ``training`` if recorded); the payload is not read."""
    path = Path(path)
    return _parse_header(path, _read(path, len(MAGIC) + _MAX_HEADER + 64))[0]


def _read_verified(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = _read(path)
    header, end = _parse_header(path, raw)
    data = raw[end + 1 :]
    if len(data) != header.get("bytes") or hashlib.sha256(data).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged (size or SHA-256 does not match its header)")
    return header, data


def _parse_header(path: Path, raw: bytes) -> tuple[dict[str, Any], int]:
    """The header of a file starting with ``raw``, and the offset of the newline that ends it."""
    end = raw.find(b"\n", 0, _MAX_HEADER + 64)
    if not raw.startswith(MAGIC + b" ") or end < 0:
        raise CheckpointError(f"{path} is not a postsense DRF checkpoint (no {MAGIC.decode()} header)")
    try:
        _, fmt, header_json = raw[:end].decode().split(" ", 2)
        header = json.loads(header_json)
        fmt_version = int(fmt)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a damaged header") from exc
    if fmt_version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {fmt_version}; this code reads format {FORMAT_VERSION}"
        )
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path} has a damaged header")
    return header, end


def _calibration_temperature(calibration: Any, path: Path) -> float | None:
    """The payload's fitted temperature; None for a checkpoint without one (saved before calibration existed)."""
    if calibration is None:
        return None
    temperature = calibration.get("temperature") if isinstance(calibration, dict) else None
    if (
        not isinstance(calibration, dict)
        or calibration.get("method") != "temperature"
        or isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise CheckpointError(
            f"checkpoint {path} has an unusable calibration {calibration!r} "
            "(expected {'method': 'temperature', 'temperature': T > 0})"
        )
    return float(temperature)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint onto the CPU; raises CheckpointError with the reason when it cannot be used."""
    path = Path(path)
    header, data = _read_verified(path)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        config, state = payload["config"], payload["state_dict"]
    except Exception as exc:  # any unpickling failure means the same thing to the caller
        raise CheckpointError(f"checkpoint {path} has an unreadable payload: {exc}") from exc
    try:
        model = DRFModel.from_config(config, pretrained=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has a configuration this code cannot build: {exc}") from exc
    if model.preprocessing != config["preprocessing"]:
        raise CheckpointError(
            f"checkpoint {path} was made with preprocessing {config['preprocessing']}, but the installed "
            f"{config['encoders']!r} encoders use {model.preprocessing}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not match the {config['encoders']!r} model: {exc}"
        ) from exc
    model.calibration_temperature = _calibration_temperature(payload.get("calibration"), path)
    model.eval()
    metadata = {k: payload[k] for k in ("created_at", "versions") if k in payload}
    metadata["config"] = config
    metadata["training"] = header.get("training")  # None: written before training records
    return Checkpoint(model=model, model_version=str(header["model_version"]), metadata=metadata)
