"""What every encoder is: the image and text encoder interfaces, their preprocessing, and the pooling they share.

A leaf module (torch, numpy and Pillow only), so that the networks (core/encoders/networks.py), the ONNX Runtime path
(sessions.py, export.py, switch.py) and the configurations (configs.py) can all build on it without a cycle.
Each encoder owns its preprocessing (image size and normalisation; tokenisation with dynamic padding and
truncation), so a checkpoint can record it and the runtime need not know it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn


class EncoderUnavailableError(RuntimeError):
    """The weights or files an encoder configuration needs are not on this machine."""


#: Pillow reduces by an integer factor (box filter) until the source is at most this many times the target, then
#: resamples once: on camera-sized photos most of the resize cost goes, within bicubic's own error.
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a PIL image becomes the encoder's input: shorter side to size/crop_pct, centre crop, normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> Tensor:
        """[3, size, size] float32; thread-safe (no shared state).

        One resampling of just the crop box (``resize(box=...)``, with Pillow's ``reduce`` first when the source is
        over twice the target) instead of resizing the whole image and cropping, and one vectorised normalisation:
        the stage table (bench/stages.py) measured both.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":  # convert() copies even an RGB image
            image = image.convert("RGB")
        scale = self.size / self.crop_pct / min(image.size)
        width, height = (
            max(self.size, round(image.width * scale)),
            max(self.size, round(image.height * scale)),
        )
        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[
            self.interpolation
        ]
        # The centre crop of the resized image, mapped back to source pixels.
        left, top = (width - self.size) // 2, (height - self.size) // 2
        sx, sy = image.width / width, image.height / height
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        pixels = np.asarray(
            image.resize((self.size, self.size), resample, box=box, reducing_gap=REDUCING_GAP)
        )
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        scale_255 = 1.0 / (np.asarray(self.std, dtype=np.float32) * 255.0)
        # One channel plane at a time, straight into [3, H, W]: numpy broadcasting over the last axis of 3 is several
        # times slower and leaves a strided tensor for the batch to copy.
        planes = np.empty((3, self.size, self.size), dtype=np.float32)
        for channel in range(3):
            np.subtract(pixels[:, :, channel], mean[channel], out=planes[channel], dtype=np.float32)
            planes[channel] *= scale_255[channel]
        return torch.from_numpy(planes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


class ImageEncoder(nn.Module, ABC):
    """pixel_values [B, 3, H, W] -> features [B, dim]."""

    dim: int
    preprocessing: ImagePreprocessing

    def preprocess(self, image: Image.Image) -> Tensor:
        return self.preprocessing(image)

    @abstractmethod
    def forward(self, pixel_values: Tensor) -> Tensor: ...


class TextEncoder(nn.Module, ABC):
    """tokenizer output -> features [B, dim]."""

    dim: int
    max_length: int

    @abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Batch tokenisation with dynamic padding (to the longest text) and truncation to ``max_length``."""

    @abstractmethod
    def forward(self, text_inputs: Mapping[str, Tensor]) -> Tensor: ...

    def preprocessing(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "tokenizer": type(self).__name__}


def masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of token states over real (unpadded) tokens; an all-padding row gives zeros, not NaN."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
