"""Export of a frozen encoder to ONNX (and, for int8, its quantisation): files keyed by the weights they hold.

An encoder is exported once and serving loads the file: at build time (``python -m core.encoders CHECKPOINT
--precision int8`` writes them beside the checkpoint), else into the cache (``$POSTSENSE_ONNX_CACHE``) on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from core.encoders.quantise import quantise
from core.encoders.sessions import require_onnxruntime
from core.files import digest_weights

#: Where exported (and quantised) ONNX models are kept, keyed by weights, precision and library versions.
ONNX_CACHE_ENV = "POSTSENSE_ONNX_CACHE"
#: Bumped when what goes into an exported file changes (export arguments, quantisation settings).
ONNX_RECIPE = 4


def onnx_cache_dir() -> Path:
    return Path(os.environ.get(ONNX_CACHE_ENV) or Path.home() / ".cache" / "postsense" / "onnx")


def onnx_dir_for(checkpoint: str | Path) -> Path:
    """Where the build step puts a checkpoint's exported encoders: ``<checkpoint>.onnx/``, beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".onnx")


@dataclass(frozen=True)
class OnnxExport:
    """How to export one encoder: the module, an example input (with padding, for texts), names, dynamic axes.

    ``weights`` is the encoder's state dict (the file's key): a checkpoint holds the same names and bytes, so an
    inference-only load finds the file without building the module.
    """

    kind: str
    module: nn.Module
    weights: Mapping[str, Tensor]
    example: dict[str, Tensor]
    output: str
    dynamic_axes: dict[str, dict[int, str]]
    # int8: yields calibration feeds (static quantisation); None means dynamic quantisation.
    calibration: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
    calibration_id: str = ""


def onnx_file_name(kind: str, precision: str, calibration_id: str, weights: Mapping[str, Tensor]) -> str:
    """``<kind>-<precision>-<key>.onnx``, the key a hash of the weights' names and bytes, the recipe (with the
    calibration set) and ONNX Runtime's release, whose quantiser makes the int8 files.

    Not torch's version: a file is the same network whichever torch traced it (the export arguments are the
    recipe's), so files made on a training machine's CUDA torch serve under the CPU image's torch.
    """
    onnxruntime = require_onnxruntime(f"the {kind} encoder's ONNX Runtime path")
    digest = hashlib.sha256(
        json.dumps([ONNX_RECIPE, kind, precision, calibration_id, onnxruntime.__version__]).encode()
    )
    digest_weights(digest, ((name, weights[name]) for name in sorted(weights)))
    return f"{kind}-{precision}-{digest.hexdigest()[:20]}.onnx"


def onnx_model_file(spec: OnnxExport, precision: str, directory: Path | None = None) -> Path:
    """The ONNX file of ``spec`` at ``precision`` in ``directory`` (default: the cache), exported on a miss.

    Written atomically, so concurrent processes at worst export twice.
    """
    require_onnxruntime(f"the {spec.kind} encoder's ONNX export", export=True)
    path = (directory or onnx_cache_dir()) / onnx_file_name(
        spec.kind, precision, spec.calibration_id, spec.weights
    )
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        exported = Path(tmp) / "fp32.onnx"
        # Traced on normal (non-inference) tensors: the first call usually comes from inside inference_mode. The
        # tracer's warnings concern data-dependent control flow; the test against torch is what guards it.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = {k: v.clone() for k, v in spec.example.items()}
            torch.onnx.export(
                spec.module.eval(),
                tuple(example.values()),
                str(exported),
                input_names=list(example),
                output_names=[spec.output],
                dynamic_axes={**spec.dynamic_axes, spec.output: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        if precision == "int8":
            exported = quantise(exported, spec.calibration)
        os.replace(exported, path)
    return path
