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

        The image is resampled once, shorter side to size/crop_pct, by torch's antialiased kernel on uint8 (Pillow's
        filter, vectorised: about 3x faster than ``Image.resize`` on camera photos and within a fraction of a grey
        level of it; bench/decode_parity.py holds it to the labels of real posts), then centre-cropped and
        normalised in place.
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
        left, top = (width - self.size) // 2, (height - self.size) // 2
        resized = nn.functional.interpolate(
            torch.from_numpy(np.array(image))
            .permute(2, 0, 1)
            .unsqueeze(0),  # HWC memory: the uint8 fast path
            size=(height, width),
            mode=self.interpolation,
            antialias=True,
        )[0, :, top : top + self.size, left : left + self.size]
        planes = resized.to(torch.float32, memory_format=torch.contiguous_format)
        mean = torch.tensor(self.mean, dtype=torch.float32).mul_(255.0).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).mul_(255.0).view(3, 1, 1)
        return planes.sub_(mean).div_(std)

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
