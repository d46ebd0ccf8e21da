"""int8 encoders: ONNX Runtime quantisation of an exported encoder, and the images the image model calibrates on.

Only the export step (core/encoders/export.py) calls this, at build time: a serving process loads the int8 files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from core.encoders.base import EncoderUnavailableError

#: Images the int8 image model is calibrated on ("a few hundred").
CALIBRATION_IMAGES = 320
#: 7-bit weights. x86 CPUs without VNNI (AVX2 only, e.g. AMD EPYC before Zen 4) multiply uint8 activations by int8
#: weights with VPMADDUBSW, whose int16 pair sums saturate at full range: the tiny test CNN's int8 features fell to
#: 0.88 mean cosine to fp32 on such a CPU, against > 0.9 on an Intel one with VNNI. A file is built once and served
#: anywhere, so it must not depend on the CPU it runs on.
REDUCE_RANGE = True


def calibration_images(directory: str | None = None, count: int = CALIBRATION_IMAGES) -> list[Image.Image]:
    """Images to calibrate the int8 image encoder's activation ranges on.

    ``directory``: the first ``count`` images in it (sorted by name), e.g. a sample of the posts a deployment
    sees. Default: seeded random crops, scales and flips of scikit-learn's two sample photos, which ship with a
    dependency (no data set needed at build time); bench/parity.py measures what this costs in accuracy.
    """
    if directory is not None:
        files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not files:
            raise EncoderUnavailableError(f"no .jpg/.png calibration images in {directory}")
        return [Image.open(p).convert("RGB") for p in files[:count]]
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = (int(photo.width * rng.uniform(0.15, 1.0)), int(photo.height * rng.uniform(0.15, 1.0)))
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        image = photo.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(image)
    return images


def quantise(fp32: Path, calibration: Callable[[], Iterator[dict[str, np.ndarray]]] | None) -> Path:
    """int8 weights (per output channel for convolutions); activations: calibrated static ranges for the CNN,
    computed per batch (dynamic) for the transformer, whose activation ranges vary from text to text.

    ``calibration`` yields the image model's calibration feeds; None (texts) means dynamic quantisation."""
    import onnx
    from onnxruntime import quantization as q

    out = fp32.with_name("int8.onnx")
    if calibration is None:
        # The feed-forward output projections stay fp32: their inputs (GELU outputs) carry outliers that one
        # dynamic int8 range per tensor crushes (min cosine to fp32 0.95 -> 0.98 on tweets; bench/parity.py).
        graph = onnx.load(fp32, load_external_data=False).graph
        outliers = [
            n.name
            for n in graph.node
            if n.op_type == "MatMul" and re.search(r"/layer\.\d+/output/dense/", n.name)
        ]
        q.quantize_dynamic(
            fp32,
            out,
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            weight_type=q.QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=outliers,
        )
        return out
    prepared = fp32.with_name("prepared.onnx")
    q.quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
    # Only the network's own float ops. timm's TF "same" padding computes pad sizes in float at run time
    # (Shape, Div, Ceil, Clip...): quantising those shifts the padding, which cost 0.1 in feature cosine.
    graph = onnx.load(prepared).graph
    produced_by = {out: node.op_type for node in graph.node for out in node.output}
    not_activations = [
        n.name for n in graph.node if n.op_type == "Clip" and produced_by.get(n.input[0]) != "Conv"
    ]

    feeds = calibration

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = feeds()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    q.quantize_static(
        prepared,
        out,
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        reduce_range=REDUCE_RANGE,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=q.CalibrationMethod.MinMax,
        op_types_to_quantize=["Conv", "Clip", "Add", "GlobalAveragePool"],
        nodes_to_exclude=not_activations,
    )
    return out
