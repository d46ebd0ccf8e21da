"""The encoder implementations: a timm image backbone and a Hugging Face text transformer (each with an ONNX Runtime
switch for CPU inference, core/encoders/switch.py), and the tiny random-init pair the tests use.

Text features are the attention-masked mean of the last hidden states for every encoder (the pooling
all-MiniLM-L6-v2 was trained with).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.encoders.base import ImageEncoder, ImagePreprocessing, TextEncoder, masked_mean
from core.encoders.export import OnnxExport
from core.encoders.switch import OnnxOnly, OnnxSwitch
from core.encoders.tweets import normalise_tweet

#: Images per ONNX Runtime call. ONNX Runtime's arena keeps the largest call's activations for good, and a CPU
#: gains no speed from larger calls, only memory (BENCHMARKS.md, memory).
ONNX_IMAGE_CHUNK = 1
#: Texts per ONNX Runtime call, each call cut to its own longest text, for the same reason. The texts are ordered
#: by length before they are cut into calls, so a call pads to texts like its own, with the same features.
ONNX_TEXT_CHUNK = 8


class TimmImageEncoder(OnnxSwitch, ImageEncoder):
    """A timm backbone with its classifier removed; features are its pooled pre-logits.

    EfficientNet-Lite0 runs faster under ONNX Runtime than in eager torch on a CPU (bench/levers.py);
    its int8 model is statically quantised on ``calibration`` images (default: ``calibration_images()``).
    ``model=None`` with ``onnx_only`` is the inference-only encoder (``dim`` then says its width).
    """

    onnx_kind = "image"

    def __init__(
        self,
        model: nn.Module | None,
        preprocessing: ImagePreprocessing,
        channels_last: bool = False,
        runtime: str = "torch",
        precision: str = "fp32",
        calibration: str | None = None,
        onnx_only: OnnxOnly | None = None,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        self._init_switch(runtime, precision, onnx_only)
        self.model = model
        self.dim = int(dim if model is None else model.num_features)  # type: ignore[arg-type]
        self.preprocessing = preprocessing
        self.calibration = calibration
        # channels_last speeds convolutions up on CPU (bench/levers.py).
        self.channels_last = channels_last
        if channels_last and model is not None:
            model.to(memory_format=torch.channels_last)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self._takes_onnx(pixel_values):
            session = self.onnx_session()
            return torch.cat(
                [session({"pixel_values": c}) for c in pixel_values.float().split(ONNX_IMAGE_CHUNK)]
            )
        assert self.model is not None
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.model(pixel_values)

    def onnx_calibration_id(self) -> str:
        from core.encoders.quantise import CALIBRATION_IMAGES

        return f"{self.calibration or 'sample-photos'}:{CALIBRATION_IMAGES}:{self.preprocessing}"

    def onnx_export(self) -> OnnxExport:
        from core.encoders.quantise import calibration_images

        assert self.model is not None
        size = self.preprocessing.size

        # Small batches: calibration keeps every activation of a batch alive (build time only, but GiBs at 16).
        def feeds(batch: int = 4) -> Iterator[dict[str, np.ndarray]]:
            images = calibration_images(self.calibration)
            for start in range(0, len(images), batch):
                pixels = torch.stack([self.preprocess(im) for im in images[start : start + batch]])
                yield {"pixel_values": pixels.numpy()}

        return OnnxExport(
            kind=self.onnx_kind,
            module=self.model,
            weights=self.state_dict(),
            example={"pixel_values": torch.zeros(2, 3, size, size)},
            output="features",
            dynamic_axes={"pixel_values": {0: "batch"}},
            calibration=feeds,
            calibration_id=self.onnx_calibration_id(),
        )


class _PooledText(nn.Module):
    """The transformer plus masked-mean pooling as one graph, so the attention mask reaches both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return masked_mean(hidden, attention_mask)


class FastTokenizer:
    """A Hugging Face fast tokenizer driven directly (the Rust ``tokenizers`` library): dynamic padding to the
    longest text, truncation to ``max_length``, the same ids as ``AutoTokenizer(..., padding=True,
    truncation=True)``. Read from the directory's tokenizer.json it needs no transformers import, which would weigh on
    a serving process's memory; a directory without one goes through AutoTokenizer's conversion.
    """

    def __init__(self, directory: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        if (directory / "tokenizer.json").is_file():
            backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            backend = AutoTokenizer.from_pretrained(directory, local_files_only=True).backend_tokenizer
        # The file's own settings may pad every text to a fixed length: pad to the batch's longest instead.
        padding = backend.padding or {}
        backend.enable_padding(
            pad_id=padding.get("pad_id", 0),
            pad_type_id=padding.get("pad_type_id", 0),
            pad_token=padding.get("pad_token", "[PAD]"),
        )
        backend.enable_truncation(max_length)
        self.backend = backend
        self.directory = directory

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        """input_ids, attention_mask, token_type_ids [B, longest] int64; thread-safe (settings fixed at init)."""
        encodings = self.backend.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
        }


class HFTextEncoder(OnnxSwitch, TextEncoder):
    """A Hugging Face encoder-only transformer with its tokenizer; features are masked-mean token states.

    Its ONNX export takes the attention mask as an input with dynamic batch and sequence axes and pools inside
    the graph: it matches torch to ~1e-6 on padded batches (tests/core/encoders/test_onnx.py). ``model=None`` with
    ``onnx_only`` is the inference-only encoder: the tokenizer, no transformer. ``dim``: its hidden size.
    """

    onnx_kind = "text"

    def __init__(
        self,
        model: nn.Module | None,
        tokenizer: FastTokenizer,
        max_length: int,
        source: str,
        runtime: str = "torch",
        precision: str = "fp32",
        onnx_only: OnnxOnly | None = None,
        *,
        dim: int,
        tweets: bool = False,
    ) -> None:
        super().__init__()
        self._init_switch(runtime, precision, onnx_only)
        self.model = model
        self.tokenizer = tokenizer
        self.dim = dim
        self.max_length = max_length
        self.source = source
        self.tweets = tweets

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Token ids of ``texts``, each first rewritten as a tweet (core/encoders/tweets.py) when ``tweets``."""
        return self.tokenizer([normalise_tweet(text) for text in texts] if self.tweets else texts)

    def forward(self, text_inputs: Mapping[str, Tensor]) -> Tensor:
        if self._takes_onnx(text_inputs["input_ids"]):
            session, lengths = self.onnx_session(), text_inputs["attention_mask"].sum(dim=1)
            order = torch.argsort(lengths, stable=True)
            chunks = []
            for rows in order.split(ONNX_TEXT_CHUNK):
                width = max(1, int(lengths[rows].max()))
                chunks.append(session({k: v[rows, :width] for k, v in text_inputs.items()}))
            by_length = torch.cat(chunks)
            features = torch.empty_like(by_length)
            features[order] = by_length  # back to the caller's row order
            return features
        assert self.model is not None
        hidden = self.model(**text_inputs).last_hidden_state
        return masked_mean(hidden, text_inputs["attention_mask"])

    def onnx_export(self) -> OnnxExport:
        assert self.model is not None
        # Two texts of different lengths: the example is padded, so nothing is traced for the all-ones mask.
        example = self.tokenize(["a short one", "a longer example text, so that the first one is padded"])
        axes = {name: {0: "batch", 1: "sequence"} for name in example}
        return OnnxExport(
            self.onnx_kind, _PooledText(self.model), self.state_dict(), example, "features", axes
        )

    def preprocessing(self) -> dict[str, Any]:
        described = {
            "max_length": self.max_length,
            "tokenizer": self.source,
            "vocab_size": len(self.tokenizer),
        }
        # Recorded only when on, so the fingerprints of existing checkpoints and feature caches stay what they were.
        return {**described, "tweets": True} if self.tweets else described


class TinyImageEncoder(ImageEncoder):
    """Two strided convolutions and global pooling: a few ms per batch, for tests."""

    def __init__(self, dim: int = 32, size: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.preprocessing = ImagePreprocessing(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.net(pixel_values)


class TinyTextEncoder(TextEncoder):
    """Hashed word embeddings, one MLP layer, masked mean: needs no vocabulary file."""

    _TOKEN = re.compile(r"\w+|[^\w\s]")

    def __init__(self, dim: int = 32, vocab_size: int = 4096, max_length: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def token_ids(self, text: str) -> list[int]:
        """Stable ids (crc32, unlike Python's salted hash) in 1..vocab_size-1; 0 is padding."""
        words = self._TOKEN.findall(text.lower())[: self.max_length]
        return [1 + zlib.crc32(word.encode()) % (self.vocab_size - 1) for word in words]

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        ids = [self.token_ids(text) for text in texts]
        width = max([1, *map(len, ids)])
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        for row, row_ids in enumerate(ids):
            input_ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}

    def forward(self, text_inputs: Mapping[str, Tensor]) -> Tensor:
        hidden = self.mlp(self.embedding(text_inputs["input_ids"]))
        return masked_mean(hidden, text_inputs["attention_mask"])

    def preprocessing(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "tokenizer": "tiny-crc32", "vocab_size": self.vocab_size}
