"""``python -m core.encoders CHECKPOINT [--precision int8] [--out DIR]``: export a checkpoint's encoders for ONNX
Runtime serving, so that serving starts warm. The only module of the encoders package that reads a checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from core.checkpoint import load_checkpoint
from core.encoders.export import onnx_dir_for, onnx_model_file
from core.encoders.sessions import PRECISIONS, auto_runtime
from core.encoders.switch import OnnxSwitch, configure_cpu_inference


def prepare_onnx(checkpoint: str | Path, precision: str, out: Path | None = None) -> list[Path]:
    """Export (and quantise) a checkpoint's encoders into ``out`` (default: beside it), so serving starts warm.

    Run it where the checkpoint is built or the pod's volume is filled (``python -m core.encoders CHECKPOINT
    --precision int8``): the exporter, the quantiser's calibration (GiBs at its peak) and the torch encoders stay out
    of the serving process, which finds the files beside the checkpoint.
    """
    model = load_checkpoint(checkpoint).model.eval()
    files = []
    for encoder in (model.image_encoder, model.text_encoder):
        configure_cpu_inference(encoder, precision=precision)
        assert isinstance(encoder, OnnxSwitch)  # configure_cpu_inference refuses any other
        files.append(onnx_model_file(encoder.onnx_export(), precision, out or onnx_dir_for(checkpoint)))
    return files


def prepare_cpu_serving(checkpoint: str | Path) -> list[Path]:
    """The fp32 files that CPU serving loads by default (``model.image_runtime = "auto"``), beside a checkpoint
    just written: training calls it, so that a first ``serve`` needs no export of its own. None when ONNX Runtime
    is not installed or the encoders have no ONNX export (the tiny test encoders)."""
    if auto_runtime() is None:
        return []
    model = load_checkpoint(checkpoint).model
    if not all(isinstance(e, OnnxSwitch) for e in (model.image_encoder, model.text_encoder)):
        return []
    return prepare_onnx(checkpoint, "fp32")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m core.encoders CHECKPOINT [--precision int8] [--out DIR]``: print the files it wrote or found."""
    parser = argparse.ArgumentParser(
        prog="python -m core.encoders", description="Export a checkpoint's encoders for ONNX Runtime serving."
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: CHECKPOINT.onnx/ beside the checkpoint"
    )
    args = parser.parse_args(argv)
    for path in prepare_onnx(args.checkpoint, args.precision, args.out):
        print(path)


if __name__ == "__main__":
    main()
