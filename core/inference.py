"""Inference API for the streaming runtime: posts in, label + probabilities + per-modality quality out.

The runtime preprocesses images and texts on CPU (``preprocess_image``, ``normalise_text``, ``prepare``; safe in
worker threads), then calls ``predict`` on one thread.  Reference-queue statistics can be swapped in from the shared
store (``set_reference_stats``) so all replicas score quality against the same distributions.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.checkpoint import load_checkpoint
from core.drf.distribution import QueueStats
from core.encoders.configs import CpuServing, cpu_serving
from core.encoders.export import onnx_dir_for
from core.encoders.sessions import AUTO_RUNTIME, auto_runtime, cpu_threads
from core.encoders.switch import OnnxSwitch, configure_cpu_inference
from core.model.drf_model import DRFModel, PreparedBatch

__all__ = ["BatchPrediction", "OutOfMemoryAtOnePost", "PreparedBatch", "Predictor", "resolve_device"]

log = logging.getLogger(__name__)


class OutOfMemoryAtOnePost(RuntimeError):
    """The device ran out of memory on a batch of one post: splitting cannot help, the model does not fit."""


@dataclass
class BatchPrediction:
    """One batch's results, all numpy / Python on CPU."""

    labels: list[str | None]  # None where abstained
    probabilities: (
        np.ndarray
    )  # [B, S] float32: softmax(logits / T), T the checkpoint's temperature (1 if none)
    quality_image: np.ndarray  # [B] in (0, 1], NaN where the image is absent
    quality_text: np.ndarray  # [B]
    recovered: list[str | None]  # "image" | "text" | None: the missing modality a converter stood in for
    # [B, 3] weights of (12): intact, image+recovered text, recovered image+text; [B, 5] with the head's specialist
    # terms (then the image alone, the text alone; all five sum to 1)
    fusion_weights: np.ndarray
    abstained: np.ndarray  # [B] bool: no usable modality
    image_features: np.ndarray  # [B, d_v] float32, zeros where absent (proposals for the reference queues)
    text_features: np.ndarray  # [B, d_t]
    # [B] bool: present and admitted by the head's queue rule against the current stats
    image_accepted: np.ndarray
    text_accepted: np.ndarray  # [B] bool

    @classmethod
    def concat(cls, parts: list[BatchPrediction]) -> BatchPrediction:
        """The predictions of consecutive sub-batches as one, rows in order."""
        joined: dict[str, Any] = {}
        for field in fields(cls):
            values = [getattr(part, field.name) for part in parts]
            lists = isinstance(values[0], list)
            joined[field.name] = [row for v in values for row in v] if lists else np.concatenate(values)
        return cls(**joined)


def _rows(batch: PreparedBatch, start: int, stop: int) -> PreparedBatch:
    """Rows ``start:stop`` of a prepared batch (views, no copy)."""
    return PreparedBatch(
        pixel_values=batch.pixel_values[start:stop],
        image_present=batch.image_present[start:stop],
        text_inputs={k: v[start:stop] for k, v in batch.text_inputs.items()},
        text_present=batch.text_present[start:stop],
    )


def _return_freed_heap() -> None:
    """Hand the heap pages a checkpoint load freed (its file's bytes, the encoder weights an inference-only load
    only hashes) back to the OS: glibc keeps them otherwise, and they would count in the service's RSS for good."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


class Predictor:
    """A DRF model in eval mode on one device, with the reference statistics it scores quality against."""

    def __init__(
        self, model: DRFModel, device: torch.device, model_version: str, mixed_precision: bool = True
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.labels = list(model.labels)
        self.model_name = f"drf-{model.encoder_name}"
        self.model_version = model_version
        self._stats = {k: v.to(device) for k, v in model.head.queue_stats().items()}
        # Temperature scaling fitted on dev (None: never fitted, probabilities are the plain softmax, as before).
        self.calibration_temperature = model.calibration_temperature
        # bfloat16 where the GPU supports it: same exponent range as float32, so no loss scaling is needed.
        self._amp_dtype: torch.dtype | None = None
        if device.type == "cuda" and mixed_precision:
            self._amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # Page-locked host batches let the copy to the GPU run asynchronously (PreparedBatch.to is non_blocking).
        self.pin_memory = device.type == "cuda"
        model.pad_image_batches = device.type == "cuda"  # a few image batch sizes for cuDNN
        # Largest batch that fitted after an out-of-memory error; later batches are cut to it up front.
        self.max_rows: int | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        mixed_precision: bool = True,
        *,
        image_runtime: str | None = None,
        text_runtime: str | None = None,
        precision: str | None = None,
    ) -> Predictor:
        """``mixed_precision`` applies on CUDA only (the CPU path always runs in float32).

        On CPU, ``image_runtime``/``text_runtime`` ("torch", "onnxruntime", or "auto": ONNX Runtime for every
        encoder that can switch when it is installed) and ``precision`` ("fp32" or "int8") switch how the encoders
        run without retraining (None: as the checkpoint says). An encoder ONNX
        Runtime serves is loaded inference-only, from the file ``python -m core.encoders`` put beside the
        checkpoint (or the ONNX cache): no torch copy of it in memory. A GPU ignores them: torch, autocast.
        """
        resolved = resolve_device(device)
        if resolved.type != "cpu":
            checkpoint = load_checkpoint(path)
            return cls(checkpoint.model, resolved, checkpoint.model_version, mixed_precision)
        # torch's default is the node's cores, not the pod's CPU quota.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(min(torch.get_num_threads(), cpu_threads()))
        auto = (image_runtime == AUTO_RUNTIME, text_runtime == AUTO_RUNTIME)
        image_runtime = auto_runtime() if auto[0] else image_runtime
        text_runtime = auto_runtime() if auto[1] else text_runtime
        with cpu_serving(CpuServing(image_runtime, text_runtime, precision, (onnx_dir_for(path),))):
            checkpoint = load_checkpoint(path)
        model = checkpoint.model
        # The offline encoders took the settings when built; the others are switched (or refuse) here, except
        # that "auto" passes over an encoder with no other runtime (the tiny test encoders).
        encoders = (model.image_encoder, model.text_encoder)
        for encoder, runtime, automatic in zip(encoders, (image_runtime, text_runtime), auto, strict=True):
            if automatic and not isinstance(encoder, OnnxSwitch):
                continue
            if runtime is not None or precision is not None:
                configure_cpu_inference(encoder, runtime, precision)
        _return_freed_heap()
        return cls(model, resolved, checkpoint.model_version, mixed_precision)

    def runtime_summary(self) -> str:
        """How each encoder runs, for the start-up log: e.g. "image onnxruntime fp32, text onnxruntime fp32"."""
        parts = []
        for name, encoder in (("image", self.model.image_encoder), ("text", self.model.text_encoder)):
            if self.device.type != "cpu" or not isinstance(encoder, OnnxSwitch):
                parts.append(f"{name} torch on {self.device}")
            elif (
                encoder.onnx_only is not None
                or encoder.runtime == "onnxruntime"
                or encoder.precision == "int8"
            ):
                parts.append(f"{name} onnxruntime {encoder.precision}")
            else:
                parts.append(f"{name} torch fp32")
        return ", ".join(parts)

    @classmethod
    def from_model(
        cls, model: DRFModel, device: str = "cpu", model_version: str = "unversioned"
    ) -> Predictor:
        return cls(model, resolve_device(device), model_version)

    @property
    def calibration(self) -> dict[str, Any] | None:
        """How ``probabilities`` are calibrated, for the sentiment record: ``{"method": "temperature",
        "temperature": T}``, or None when the checkpoint has no fitted temperature (plain softmax)."""
        if self.calibration_temperature is None:
            return None
        return {"method": "temperature", "temperature": float(self.calibration_temperature)}

    @property
    def decode_size(self) -> int:
        """The shorter side the image preprocessing scales to before its centre crop: a JPEG decoded (DCT-scaled)
        down to no less than this loses nothing the encoder would see."""
        preprocessing = self.model.image_encoder.preprocessing
        return math.ceil(preprocessing.size / preprocessing.crop_pct)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """[3, H, W] float tensor, the encoder's own resize/crop/normalisation; thread-safe."""
        return self.model.image_encoder.preprocess(image)

    @staticmethod
    def normalise_text(text: str | None) -> str | None:
        """Strip whitespace; empty or whitespace-only text counts as missing (None)."""
        if text is None:
            return None
        if not isinstance(text, str):
            raise TypeError(f"text must be str or None, got {type(text).__name__}")
        text = text.strip()
        return text or None

    def prepare(self, images: list[torch.Tensor | None], texts: list[str | None]) -> PreparedBatch:
        """Stack preprocessed images and tokenise texts; None (or empty text) marks a missing modality."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts")
        if not images:
            raise ValueError("cannot prepare an empty batch")
        size = self.model.image_encoder.preprocessing.size
        pixel_values = torch.zeros(len(images), 3, size, size, pin_memory=self.pin_memory)
        for row, image in enumerate(images):
            if image is None:
                continue
            if not isinstance(image, torch.Tensor) or tuple(image.shape) != (3, size, size):
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(
                    f"image {row} must be a preprocessed [3, {size}, {size}] tensor, got {shape}"
                )
            pixel_values[row] = image
        normalised = [self.normalise_text(text) for text in texts]
        # Missing texts tokenise as "" only to keep the batch rectangular; they are never encoded.
        text_inputs = self.model.text_encoder.tokenize([text or "" for text in normalised])
        if self.pin_memory:
            text_inputs = {k: v.pin_memory() for k, v in text_inputs.items()}
        return PreparedBatch(
            pixel_values=pixel_values,
            image_present=torch.tensor([image is not None for image in images]),
            text_inputs=text_inputs,
            text_present=torch.tensor([text is not None for text in normalised]),
        )

    def predict(self, batch: PreparedBatch) -> BatchPrediction:
        """Deterministic eval-mode prediction; mixed precision on CUDA.

        A batch the device has no memory for is split in halves (recursively) and the halves' results are
        joined, so no post of it is lost; the size that fitted caps later batches. Out of memory on a single
        post raises ``OutOfMemoryAtOnePost``.
        """
        size = len(batch)
        cap = self.max_rows or size
        if size > cap:
            return BatchPrediction.concat(
                [self.predict(_rows(batch, i, min(i + cap, size))) for i in range(0, size, cap)]
            )
        try:
            return self._predict(batch)
        except torch.cuda.OutOfMemoryError as exc:
            if size == 1:
                raise OutOfMemoryAtOnePost(
                    f"out of memory on {self.device} for a single post: the model does not fit ({exc})"
                ) from exc
        # The halves run only here, after the handler: inside it the error's traceback would keep the failed
        # attempt's frames, and every tensor they had put on the device, alive through the retry (seen on an
        # H200: 200 MiB held over 8 splits, so even one post ran out).
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.max_rows = size // 2
        log.warning(
            "out of memory on %s at a batch of %d posts: split; batches now at most %d",
            self.device,
            size,
            self.max_rows,
        )
        return self.predict(batch)

    @torch.inference_mode()
    def _predict(self, batch: PreparedBatch) -> BatchPrediction:
        stats = self._stats  # one consistent snapshot even if set_reference_stats runs meanwhile
        with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._amp_dtype is not None):
            out = self.model(batch.to(self.device), stats=stats)
        image_present = out.image_present.cpu().numpy()
        text_present = out.text_present.cpu().numpy()
        abstained = out.abstained.cpu().numpy()
        # Labels are the argmax of the unscaled softmax, so a temperature cannot move one (not even on a float tie);
        # the published probabilities are softmax(logits / T).
        predicted = out.probabilities.float().cpu().numpy().argmax(-1)
        temperature = self.calibration_temperature
        scaled = out.probabilities if temperature is None else (out.logits.float() / temperature).softmax(-1)
        probabilities = scaled.float().cpu().numpy()
        image_features = out.image_features.float()
        text_features = out.text_features.float()
        # The shared queues admit by the same rule as training did (the head's admission rule).
        head = self.model.head
        image_accepted = head.image_queue.admits(image_features, stats["image"]) & out.image_present
        text_accepted = head.text_queue.admits(text_features, stats["text"]) & out.text_present
        recovered: list[str | None] = [
            "text" if v and not t else "image" if t and not v else None
            for v, t in zip(image_present, text_present, strict=True)
        ]
        return BatchPrediction(
            labels=[None if a else self.labels[i] for a, i in zip(abstained, predicted, strict=True)],
            probabilities=probabilities.astype(np.float32),
            quality_image=np.where(image_present, out.log_quality_image.exp().cpu().numpy(), np.nan),
            quality_text=np.where(text_present, out.log_quality_text.exp().cpu().numpy(), np.nan),
            recovered=recovered,
            fusion_weights=out.term_weights.float().cpu().numpy(),
            abstained=abstained,
            image_features=image_features.cpu().numpy(),
            text_features=text_features.cpu().numpy(),
            image_accepted=image_accepted.cpu().numpy(),
            text_accepted=text_accepted.cpu().numpy(),
        )

    def reference_stats(self) -> dict[str, QueueStats]:
        """The statistics quality is currently scored against (CPU copies), keys "image" and "text"."""
        return {k: v.to("cpu") for k, v in self._stats.items()}

    def set_reference_stats(self, stats: dict[str, QueueStats]) -> None:
        """Swap in statistics from the shared reference queues; validated before anything changes."""
        if set(stats) != {"image", "text"}:
            raise ValueError(f"reference stats need exactly the keys 'image' and 'text', got {sorted(stats)}")
        widths = dict(zip(("image", "text"), self.model.head.config.widths, strict=True))
        for key, value in stats.items():
            dim = widths[key]
            if not isinstance(value, QueueStats) or value.dim != dim or value.mean.dim() != 1:
                raise ValueError(f"{key} reference stats must be QueueStats with a [{dim}] mean")
            numbers = torch.cat(
                [
                    value.mean.float().flatten(),
                    value.sigma.float().flatten(),
                    value.threshold.float().flatten(),
                ]
            )
            if not bool(torch.isfinite(numbers).all()) or float(value.sigma) <= 0:
                raise ValueError(f"{key} reference stats must be finite with sigma > 0")
        self._stats = {k: v.to(self.device) for k, v in stats.items()}

    def checkpoint_queues(self) -> dict[str, torch.Tensor]:
        """The checkpoint's queue contents [n <= L, d], oldest first (to seed the shared reference queues)."""
        head = self.model.head
        return {
            "image": head.image_queue.contents().cpu().clone(),
            "text": head.text_queue.contents().cpu().clone(),
        }
