"""Files the model writes and the keys they are found by: atomic writes, and the digest of a set of weights.

A leaf module (torch only): checkpoints, feature-cache shards, training state and exported encoders all use it.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def digest_weights(digest: Digest, weights: Iterable[tuple[str, Tensor]]) -> None:
    """Feed each weight's name and raw bytes to ``digest``, in the order given: the order is part of the key, so
    callers that must match keys already on disk keep theirs (state-dict order, or sorted names)."""
    for name, tensor in weights:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_atomically(path: Path, *chunks: bytes) -> None:
    """Write ``chunks`` to ``path`` through a temporary file in its folder and a rename: readers, and a run killed
    midway, see the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
        # mkstemp creates 0600; a checkpoint is read by the service's own (non-root) user in the container.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def torch_save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` through ``write_atomically`` (feature cache shards, training state)."""
    write_atomically(path, torch_bytes(obj))
