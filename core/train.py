"""Training the DRF model (paper section 4.2): AdamW with two learning rates, cosine decay, dev-only model selection.

With frozen encoders (the default) each image and text is encoded once and its pre-projection feature is cached on
disk, keyed by the encoders' fingerprint and by *what the encoder saw*: the image source plus any pixel mask of the
disruption protocol, or the exact (possibly [MASK]ed) text.  Disruption happens before encoding, so a corrupted
sample gets its own cache entry, deterministically, and the head then trains on cached features in seconds.
With ``freeze_encoders=False`` the same loop runs the encoders on every batch (the paper's fine-tuning, a GPU job).

Training is resumable: after every epoch a state file holds weights, optimizer, scheduler, RNG, history and the best
dev state, so an interrupted run continued with ``resume=True`` ends in the same state as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from core.data.records import Sample, load_image, stratified_split
from core.encoders import ONNX_RECIPE
from core.model import DRFModel, PreparedBatch, create_model
from core.progress import progress as progress_bar

log = logging.getLogger(__name__)

#: Size load_image gives before the encoder's own preprocessing: the disruption masks pixels at this size.
IMAGE_LOAD_SIZE = (224, 224)
#: Below this many images to encode, exporting the image encoder to ONNX Runtime costs more than it saves.
ORT_MIN_IMAGES = 64
#: Largest |ONNX - torch| feature difference accepted before falling back to torch (float32 reorderings are ~1e-5).
ORT_TOLERANCE = 1e-3
#: The demo model: a DRF head trained on part of the VADER demo set (cold cache: a few minutes on 2 cores).
DEMO_TRAIN_SAMPLES = 1200
DEMO_DEV_SAMPLES = 300


class TrainingError(RuntimeError):
    """Training cannot start or continue as asked (e.g. a state file from a different configuration)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the paper's (batch 16, 30 epochs, 2e-5 / 2e-4, cosine to 1e-6)."""

    epochs: int = 30
    batch_size: int = 16
    encoder_lr: float = 2e-5
    head_lr: float = 2e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("encoder_lr", "head_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= min(self.encoder_lr, self.head_lr):
            problems.append(f"min_lr must lie in [0, min(encoder_lr, head_lr)], got {self.min_lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The CPU configuration of the demo model and the evaluation (frozen encoders, cached features): a small fusion
#: width (d = 128; paper 768), the paper's queue length L = 512, and a higher head learning rate for few steps
#: (paper: 2e-4 over 30 epochs at batch 16; at 2e-4 a few hundred steps leave DRF predicting the majority class).
CPU_DIM = 128
CPU_QUEUE_SIZE = 512
CPU_TRAIN = TrainConfig(epochs=8, batch_size=64, head_lr=1e-3)


# ------------------------------------------------------------------------------------------- feature tables


@dataclass
class FeatureTable:
    """Pre-projection features of a list of samples; rows of an absent modality are zeros (lambda = 0)."""

    image: Tensor  # [n, D_v]
    text: Tensor  # [n, D_t]
    image_present: Tensor  # [n] bool
    text_present: Tensor  # [n] bool
    labels: Tensor  # [n] long

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, index: Tensor) -> FeatureTable:
        return FeatureTable(
            self.image[index], self.text[index], self.image_present[index], self.text_present[index], self.labels[index]
        )


class FeatureCache:
    """Cached encoder features on disk: one folder per encoder fingerprint, append-only shard files per modality.

    Shards are written atomically under unique names, so concurrent or interrupted runs never corrupt the cache;
    a killed encoding run keeps every shard it finished.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rows: dict[str, dict[str, Tensor]] = {}

    def _loaded(self, modality: str) -> dict[str, Tensor]:
        if modality not in self._rows:
            rows: dict[str, Tensor] = {}
            for shard in sorted(self.directory.glob(f"{modality}-*.pt")):
                try:
                    data = torch.load(shard, map_location="cpu", weights_only=True)
                    rows.update(zip(data["keys"], data["features"], strict=True))
                except Exception as exc:  # noqa: BLE001 - a damaged shard is only a cache miss
                    log.warning("ignoring unreadable feature cache shard %s: %s", shard, exc)
            self._rows[modality] = rows
        return self._rows[modality]

    def missing(self, modality: str, keys: Sequence[str]) -> list[str]:
        """The distinct keys not cached yet, in first-seen order."""
        rows = self._loaded(modality)
        return list(dict.fromkeys(k for k in keys if k not in rows))

    def get(self, modality: str, keys: Sequence[str]) -> Tensor:
        rows = self._loaded(modality)
        return torch.stack([rows[k] for k in keys])

    def put(self, modality: str, keys: Sequence[str], features: Tensor) -> None:
        features = features.detach().float().cpu().contiguous()
        _atomic_torch_save({"keys": list(keys), "features": features}, self.directory / f"{modality}-{uuid.uuid4().hex}.pt")
        self._loaded(modality).update(zip(keys, features, strict=True))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encoder_fingerprint(model: DRFModel) -> str:
    """Identifies what a cached feature depends on: encoder configuration, preprocessing and exact weights."""
    digest = hashlib.sha256()
    described = {
        "encoders": model.encoder_name,
        "options": model.encoder_options,
        "preprocessing": model.preprocessing,
        "image_load_size": IMAGE_LOAD_SIZE,
    }
    if model.encoder_options.get("precision") == "int8":  # int8 features depend on the quantisation recipe too
        described["onnx_recipe"] = ONNX_RECIPE
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for prefix, encoder in (("image", model.image_encoder), ("text", model.text_encoder)):
        for name, tensor in encoder.state_dict().items():
            digest.update(f"{prefix}.{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def feature_cache_for(model: DRFModel, root: str | Path) -> FeatureCache:
    """The cache folder under ``root`` for this model's encoders."""
    return FeatureCache(Path(root) / f"{model.encoder_name}-{encoder_fingerprint(model)}")


def image_key(sample: Sample) -> str | None:
    """Cache key of the image the encoder sees: its source plus the disruption's pixel mask, if any."""
    source = sample.image
    if source is None:
        return None
    if isinstance(source, Path):
        stat = source.stat()
        ident = f"path:{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    elif isinstance(source, bytes):
        ident = "bytes:" + hashlib.sha1(source).hexdigest()
    else:
        ident = f"pil:{source.mode}:{source.size}:" + hashlib.sha1(source.tobytes()).hexdigest()
    d = sample.disruption
    if d is not None and d.modality == "image" and d.kind == "corrupt":
        ident += f"|mask:{d.fraction!r}:{d.seed}"
    return hashlib.sha1(ident.encode()).hexdigest()


def text_key(text: str) -> str:
    """Cache key of a text: the text itself (after the disruption's [MASK]ing)."""
    return hashlib.sha1(b"text:" + text.encode()).hexdigest()


def _torch_image_runner(model: DRFModel) -> Callable[[Tensor], Tensor]:
    def run(pixel_values: Tensor) -> Tensor:
        with torch.inference_mode():
            return model.encode_images(pixel_values)

    return run


def _ort_image_runner(model: DRFModel) -> Callable[[Tensor], Tensor] | None:
    """The frozen image encoder through ONNX Runtime (the encoder's own switch; about 2x faster on this CPU),
    or None when unavailable. Checked against torch on a random batch before it is trusted.
    """
    encoder = model.image_encoder
    if not hasattr(encoder, "runtime") or importlib.util.find_spec("onnxruntime") is None:
        return None
    fast = copy.deepcopy(encoder).eval()
    fast.runtime = "onnxruntime"

    def run(pixel_values: Tensor) -> Tensor:
        with torch.inference_mode():
            return fast(pixel_values)

    try:
        size = encoder.preprocessing.size
        probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        got, expected = run(probe), _torch_image_runner(model)(probe)
    except Exception as exc:  # noqa: BLE001 - any export/runtime failure only costs speed
        log.warning("ONNX Runtime image encoding unavailable (%s); encoding with torch", exc)
        return None
    if got.shape != expected.shape or float((got - expected).abs().max()) > ORT_TOLERANCE:
        log.warning("ONNX image encoder disagrees with torch; encoding with torch instead")
        return None
    return run


def _load_pixels(model: DRFModel, sample: Sample) -> Tensor:
    image = load_image(sample, IMAGE_LOAD_SIZE)
    assert image is not None
    return model.image_encoder.preprocess(image)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encode_missing_images(
    model: DRFModel, cache: FeatureCache, samples: Sequence[Sample], batch_size: int, progress: bool
) -> None:
    keyed = {image_key(s): s for s in samples if s.image is not None}
    todo = cache.missing("image", list(keyed))
    if not todo:
        return
    run = (_ort_image_runner(model) if len(todo) >= ORT_MIN_IMAGES and model.freeze_encoders else None)
    run = run or _torch_image_runner(model)
    bar = progress_bar(total=len(todo), desc="encode images", unit="img", disable=not progress, leave=False)
    # Decoding and masking overlap with encoding: PIL releases the GIL.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(_load_pixels, model, keyed[k]) for k in todo[:batch_size]]
        for start in range(0, len(todo), batch_size):
            keys = todo[start : start + batch_size]
            pixels = torch.stack([f.result() for f in pending])
            pending = [pool.submit(_load_pixels, model, keyed[k]) for k in todo[start + batch_size : start + 2 * batch_size]]
            cache.put("image", keys, run(pixels))
            bar.update(len(keys))
    bar.close()


def _encode_missing_texts(
    model: DRFModel, cache: FeatureCache, texts: Sequence[str], batch_size: int, progress: bool
) -> None:
    keyed = {text_key(t): t for t in texts}
    todo = cache.missing("text", list(keyed))
    if not todo:
        return
    # Similar lengths per batch keep dynamic padding short.
    todo.sort(key=lambda k: len(keyed[k]))
    bar = progress_bar(total=len(todo), desc="encode texts", unit="text", disable=not progress, leave=False)
    for keys in _chunks(todo, batch_size):
        with torch.inference_mode():
            features = model.encode_texts(model.text_encoder.tokenize([keyed[k] for k in keys]))
        cache.put("text", keys, features)
        bar.update(len(keys))
    bar.close()


def encode_samples(
    model: DRFModel, samples: Sequence[Sample], cache: FeatureCache, batch_size: int = 32, progress: bool = False
) -> FeatureTable:
    """Features of ``samples`` (disruptions applied), encoding only what the cache lacks."""
    if not samples:
        raise ValueError("no samples to encode")
    model.eval()
    _encode_missing_images(model, cache, samples, batch_size, progress)
    _encode_missing_texts(model, cache, [s.text for s in samples if s.text is not None], batch_size * 2, progress)
    n = len(samples)
    image_present = torch.tensor([s.image is not None for s in samples])
    text_present = torch.tensor([s.text is not None for s in samples])
    image = torch.zeros(n, model.image_encoder.dim)
    text = torch.zeros(n, model.text_encoder.dim)
    if bool(image_present.any()):
        image[image_present] = cache.get("image", [image_key(s) for s in samples if s.image is not None])
    if bool(text_present.any()):
        text[text_present] = cache.get("text", [text_key(s.text) for s in samples if s.text is not None])
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return FeatureTable(image, text, image_present, text_present, labels)


def encode_padding(model: DRFModel, cache: FeatureCache) -> tuple[Tensor, Tensor]:
    """Features of a blank (black) image and an all-[MASK] text: the paper's padding for methods that cannot
    take a missing modality (section 4.3)."""
    blank = Sample("padding", PADDING_TEXT, Image.new("RGB", IMAGE_LOAD_SIZE), 0, ("padding",))
    table = encode_samples(model, [blank], cache)
    return table.image[0], table.text[0]


#: A missing text for the padding baselines: [MASK] tokens at about a tweet's median length (16 words).
PADDING_TEXT = " ".join(["[MASK]"] * 16)


# ----------------------------------------------------------------------------------------------- training


class Trainable(Protocol):
    """What ``fit`` trains: the DRF model or a baseline head on pre-projection features."""

    def forward_features(
        self, image_features: Tensor, text_features: Tensor, image_present: Tensor, text_present: Tensor,
        labels: Tensor | None = None,
    ) -> Any: ...  # an output with .logits and, given labels, .loss

    def parameter_groups(self, encoder_lr: float, head_lr: float) -> list[dict[str, Any]]: ...

    def train(self, mode: bool = True) -> Any: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> Any: ...


class FeatureSource(Protocol):
    """Rows of pre-projection features for index batches, with their labels."""

    labels: Tensor

    def __len__(self) -> int: ...

    def features(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


class CachedSource:
    """Batches from a FeatureTable (frozen encoders)."""

    def __init__(self, table: FeatureTable) -> None:
        self.table = table
        self.labels = table.labels

    def __len__(self) -> int:
        return len(self.table)

    def features(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t = self.table
        return t.image[index], t.text[index], t.image_present[index], t.text_present[index]


class SampleSource:
    """Batches encoded on the fly (fine-tuned encoders): gradient reaches the encoders when they are not frozen."""

    def __init__(self, model: DRFModel, samples: Sequence[Sample]) -> None:
        if not samples:
            raise ValueError("no samples")
        self.model = model
        self.samples = list(samples)
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def features(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        rows = [self.samples[i] for i in index.tolist()]
        size = model.image_encoder.preprocessing.size
        pixels = torch.stack(
            [_load_pixels(model, s) if s.image is not None else torch.zeros(3, size, size) for s in rows]
        )
        batch = PreparedBatch(
            pixel_values=pixels,
            image_present=torch.tensor([s.image is not None for s in rows]),
            text_inputs=model.text_encoder.tokenize([s.text or "" for s in rows]),
            text_present=torch.tensor([s.text is not None for s in rows]),
        )
        device = next(model.parameters()).device
        batch = batch.to(device)
        image, text = model.encode_batch(batch)
        return image, text, batch.image_present, batch.text_present


def _device_of(model: Trainable) -> torch.device:
    return next(iter(model.state_dict().values())).device


@torch.no_grad()
def predict(model: Trainable, source: FeatureSource, batch_size: int = 256) -> np.ndarray:
    """Class probabilities [n, S] in eval mode (the caller's train/eval mode is restored)."""
    was_training = getattr(model, "training", False)
    model.train(False)
    device = _device_of(model)
    out = []
    for index in torch.arange(len(source)).split(batch_size):
        image, text, image_present, text_present = (x.to(device) for x in source.features(index))
        logits = model.forward_features(image, text, image_present, text_present).logits
        out.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def classification_scores(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and support-weighted F1 (the paper's ACC/F1), in percent."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if labels.shape != predicted.shape or labels.size == 0:
        raise ValueError(f"need equally long, non-empty label arrays, got {labels.shape} and {predicted.shape}")
    f1s, support = [], []
    for c in range(num_classes):
        tp = int(np.sum((predicted == c) & (labels == c)))
        fp = int(np.sum((predicted == c) & (labels != c)))
        fn = int(np.sum((predicted != c) & (labels == c)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        support.append(int(np.sum(labels == c)))
    weighted_f1 = float(np.dot(f1s, support) / max(1, sum(support)))
    return {"accuracy": 100.0 * float(np.mean(labels == predicted)), "weighted_f1": 100.0 * weighted_f1}


def score(model: Trainable, source: FeatureSource, num_classes: int) -> dict[str, float]:
    probabilities = predict(model, source)
    return classification_scores(source.labels.numpy(), probabilities.argmax(-1), num_classes)


@dataclass
class TrainResult:
    """What a run did; ``model`` holds the best-dev-accuracy weights when it returns."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_dev_accuracy: float = -1.0
    seconds: float = 0.0


def _num_classes(model: Trainable) -> int:
    labels = getattr(model, "labels", None)
    if labels is None:
        raise TypeError("the model needs a .labels list")
    return len(labels)


def fit(
    model: Trainable,
    train: FeatureSource,
    dev: FeatureSource,
    config: TrainConfig,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` and leave it with the weights of the epoch with the best dev accuracy (never test).

    ``state_path`` gets the full training state after every epoch; with ``resume`` training continues from it.
    The caller seeds the model's initialisation; ``config.seed`` fixes the batch order and dropout.
    """
    # Quality weights of (12) are products of exponentials; their gradients underflow into denormal floats, which
    # x86 CPUs handle ~10x slower. Flushing them to zero changes nothing measurable and halves a CPU epoch. It is
    # process-wide CPU state, so it is switched off again (Python starts with it off) for whatever runs next.
    torch.set_flush_denormal(True)
    try:
        return _fit(model, train, dev, config, state_path, resume, progress, description)
    finally:
        torch.set_flush_denormal(False)


def _fit(
    model: Trainable,
    train: FeatureSource,
    dev: FeatureSource,
    config: TrainConfig,
    state_path: str | Path | None,
    resume: bool,
    progress: bool,
    description: str,
) -> TrainResult:
    if len(train) == 0 or len(dev) == 0:
        raise ValueError("training needs non-empty train and dev sets")
    num_classes = _num_classes(model)
    optimizer = torch.optim.AdamW(
        model.parameter_groups(config.encoder_lr, config.head_lr), weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch, eta_min=config.min_lr
    )
    result = TrainResult()
    best_state: dict[str, Tensor] | None = None
    start_epoch = 0
    identity = {"config": config.to_dict(), "train_size": len(train), "dev_size": len(dev)}
    state_file = Path(state_path) if state_path is not None else None
    if resume:
        if state_file is None or not state_file.is_file():
            raise TrainingError(f"cannot resume: no training state at {state_file}")
        state = _load_state(state_file)
        if state["identity"] != identity:
            raise TrainingError(
                f"cannot resume from {state_file}: it was written for {state['identity']}, this run is {identity}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch = int(state["epoch"])
        best_state = state["best"]
        result = TrainResult(list(state["history"]), int(state["best_epoch"]), float(state["best_dev_accuracy"]))
    else:
        torch.manual_seed(config.seed)
    after_step = getattr(model, "update_queues", None)
    diagnose = getattr(model, "diagnostics", None)
    device = _device_of(model)
    started = time.monotonic()
    bar = progress_bar(
        total=config.epochs * steps_per_epoch, desc=description, unit="step", disable=not progress, leave=False
    )
    bar.update(start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, config.epochs):
        model.train(True)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        losses = []
        admitted = {"image": [0, 0], "text": [0, 0]}  # accepted, offered (present) features this epoch
        for index in order.split(config.batch_size):
            image, text, image_present, text_present = (x.to(device) for x in train.features(index))
            out = model.forward_features(image, text, image_present, text_present, labels=train.labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                accepted = after_step(out)
                for name, mask, present in zip(admitted, accepted, (out.image_present, out.text_present), strict=True):
                    admitted[name][0] += int(mask.sum())
                    admitted[name][1] += int(present.sum())
            losses.append(float(out.loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", dev_acc=f"{result.best_dev_accuracy:.1f}")
        dev_scores = score(model, dev, num_classes)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_accuracy": dev_scores["accuracy"]}
        if diagnose is not None:
            record.update({f"acceptance_{k}": a / max(1, n) for k, (a, n) in admitted.items()})
            record.update(diagnose(*(x.to(device) for x in dev.features(torch.arange(len(dev))))))
        result.history.append(record)
        if dev_scores["accuracy"] > result.best_dev_accuracy:
            result.best_dev_accuracy, result.best_epoch = dev_scores["accuracy"], epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", dev_acc=f"{dev_scores['accuracy']:.1f}")
        log.info("%s epoch %d/%d: loss %.4f, dev accuracy %.2f", description, epoch + 1, config.epochs,
                 record["train_loss"], record["dev_accuracy"])
        if state_file is not None:
            _atomic_torch_save(
                {
                    "identity": identity,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "best": best_state,
                    "best_epoch": result.best_epoch,
                    "best_dev_accuracy": result.best_dev_accuracy,
                    "history": result.history,
                },
                state_file,
            )
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.train(False)
    result.seconds = time.monotonic() - started
    return result


@contextmanager
def one_thread() -> Iterator[None]:
    """Train heads on one thread: their matrices are small, so one thread is as fast on an idle CPU and several
    times faster on a busy shared one, where OpenMP threads wait on each other at every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged state file is reported, not crashed on
        raise TrainingError(f"training state {path} is unreadable ({exc}); delete it to start over") from exc


# ---------------------------------------------------------------------------------------------- the demo


def _stratified_subset(samples: Sequence[Sample], size: int) -> list[Sample]:
    """``size`` samples with the label proportions of ``samples`` (all of them if there are fewer)."""
    if len(samples) <= size:
        return list(samples)
    return stratified_split(samples, {"keep": size, "rest": len(samples) - size}, seed=0)["keep"]


def ensure_demo_model(data_dir: str | Path, out_path: str | Path, progress: bool = True) -> Path:
    """The demo's checkpoint: reused when ``out_path`` exists, else trained on part of the VADER demo set.

    Offline encoders, frozen, with features cached under ``data_dir/features`` (shared with ``postsense evaluate``,
    so after an evaluation this only trains the head).
    """
    from core.checkpoint import save_checkpoint
    from core.data.vader import load_vader

    out = Path(out_path)
    if out.is_file():
        return out
    dataset = load_vader(data_dir)
    torch.manual_seed(0)
    model = create_model("offline", dataset.label_names, dim=CPU_DIM, queue_size=CPU_QUEUE_SIZE)
    cache = feature_cache_for(model, Path(data_dir) / "features")
    train = encode_samples(model, _stratified_subset(dataset["train"], DEMO_TRAIN_SAMPLES), cache, progress=progress)
    dev = encode_samples(model, _stratified_subset(dataset["dev"], DEMO_DEV_SAMPLES), cache, progress=progress)
    config = replace(CPU_TRAIN, batch_size=32, epochs=10)
    with one_thread():
        result = fit(model, CachedSource(train), CachedSource(dev), config, progress=progress, description="demo model")
    log.info("demo model: best dev accuracy %.1f%% at epoch %d", result.best_dev_accuracy, result.best_epoch)
    save_checkpoint(model, out)
    return out
