"""The image and text encoders: interfaces (``base``), torch networks (``networks``), the named configurations
(``configs``), and CPU inference through ONNX Runtime (``sessions``, ``export``, ``switch``, ``quantise``).

``python -m core.encoders CHECKPOINT --precision int8`` exports a checkpoint's encoders (``__main__``, the only
module here that reads a checkpoint).
"""

from core.encoders.base import EncoderUnavailableError, ImageEncoder, ImagePreprocessing, TextEncoder
from core.encoders.configs import (
    ENCODER_CONFIGS,
    LITE_SIZES,
    CpuServing,
    Encoders,
    cpu_serving,
    create_encoders,
)
from core.encoders.export import ONNX_CACHE_ENV, onnx_cache_dir, onnx_dir_for
from core.encoders.sessions import PRECISIONS, RUNTIMES, cpu_threads
from core.encoders.switch import configure_cpu_inference

__all__ = [
    "ENCODER_CONFIGS",
    "LITE_SIZES",
    "ONNX_CACHE_ENV",
    "PRECISIONS",
    "RUNTIMES",
    "CpuServing",
    "EncoderUnavailableError",
    "Encoders",
    "ImageEncoder",
    "ImagePreprocessing",
    "TextEncoder",
    "configure_cpu_inference",
    "cpu_serving",
    "cpu_threads",
    "create_encoders",
    "onnx_cache_dir",
    "onnx_dir_for",
]
