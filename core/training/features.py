"""Encoder features for training: a disk cache, encoding of what it lacks, and the sources ``fit`` draws batches from.

With frozen encoders (the default) each image and text is encoded once and its pre-projection feature is cached on
disk, keyed by the encoders' fingerprint and by *what the encoder saw*: the image source plus any pixel mask of the
disruption protocol, or the exact (possibly [MASK]ed) text.  Disruption happens before encoding, so a corrupted
sample gets its own cache entry, deterministically, and the head then trains on cached features in seconds
(``CachedSource``).  With ``freeze_encoders=False`` the encoders run on every batch instead (``SampleSource``: the
paper's fine-tuning, a GPU job).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from core.data.records import Sample, load_image
from core.encoders.base import ImageEncoder
from core.encoders.export import ONNX_RECIPE
from core.files import digest_weights, torch_save_atomically
from core.model.drf_model import DRFModel, FeatureTable, PreparedBatch
from core.progress import progress as progress_bar

log = logging.getLogger(__name__)

#: Size load_image gives before the encoder's own preprocessing: the disruption masks pixels at this size.
#: An encoder whose input is larger (EfficientNet-Lite1/2) gets its own size instead (``image_load_size``).
IMAGE_LOAD_SIZE = (224, 224)
#: Below this many images to encode, exporting the image encoder to ONNX Runtime costs more than it saves.
ORT_MIN_IMAGES = 64
#: Largest |ONNX - torch| feature difference accepted before falling back to torch (float32 reorderings are ~1e-5).
ORT_TOLERANCE = 1e-3
#: A missing text for the padding baselines: [MASK] tokens at about a tweet's median length (16 words).
PADDING_TEXT = " ".join(["[MASK]"] * 16)


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
                except Exception as exc:  # a damaged shard, whatever the damage, is only a cache miss
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
        torch_save_atomically(
            {"keys": list(keys), "features": features}, self.directory / f"{modality}-{uuid.uuid4().hex}.pt"
        )
        self._loaded(modality).update(zip(keys, features, strict=True))


def image_load_size(encoder: ImageEncoder) -> tuple[int, int]:
    """What an image is resized to before the encoder's preprocessing: ``IMAGE_LOAD_SIZE``, or the encoder's input
    size where that is larger, so a 240-px encoder is not fed 224-px images scaled up."""
    size = encoder.preprocessing.size
    return (size, size) if size > IMAGE_LOAD_SIZE[0] else IMAGE_LOAD_SIZE


def encoder_fingerprint(model: DRFModel) -> str:
    """Identifies what a cached feature depends on: encoder configuration, preprocessing and exact weights."""
    digest = hashlib.sha256()
    described: dict[str, Any] = {
        "encoders": model.encoder_name,
        "options": model.encoder_options,
        "preprocessing": model.preprocessing,
        "image_load_size": image_load_size(model.image_encoder),
    }
    # int8 features depend on the quantisation recipe too.
    if model.encoder_options.get("precision") == "int8":
        described["onnx_recipe"] = ONNX_RECIPE
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for prefix, encoder in (("image", model.image_encoder), ("text", model.text_encoder)):
        digest_weights(digest, ((f"{prefix}.{name}", w) for name, w in encoder.state_dict().items()))
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
    """The frozen image encoder through ONNX Runtime (the encoder's own switch; faster on a CPU),
    or None when unavailable. Checked against torch on a random batch before it is trusted.
    """
    encoder = model.image_encoder
    if not hasattr(encoder, "runtime") or importlib.util.find_spec("onnxruntime") is None:
        return None
    fast = copy.deepcopy(encoder).eval()
    fast.runtime = "onnxruntime"  # type: ignore[assignment]  # the encoder's runtime switch, a plain str attribute

    def run(pixel_values: Tensor) -> Tensor:
        with torch.inference_mode():
            return fast(pixel_values)

    try:
        size = encoder.preprocessing.size
        probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        got, expected = run(probe), _torch_image_runner(model)(probe)
    except Exception as exc:  # any export or runtime failure only costs speed: torch encodes instead
        log.warning("ONNX Runtime image encoding unavailable (%s); encoding with torch", exc)
        return None
    if got.shape != expected.shape or float((got - expected).abs().max()) > ORT_TOLERANCE:
        log.warning("ONNX image encoder disagrees with torch; encoding with torch instead")
        return None
    return run


def _load_pixels(model: DRFModel, sample: Sample) -> Tensor:
    image = load_image(sample, image_load_size(model.image_encoder))
    assert image is not None
    return model.image_encoder.preprocess(image)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encode_missing_images(
    model: DRFModel, cache: FeatureCache, samples: Sequence[Sample], batch_size: int, progress: bool
) -> None:
    keyed = {key: s for s in samples if (key := image_key(s)) is not None}
    todo = cache.missing("image", list(keyed))
    if not todo:
        return
    run = _ort_image_runner(model) if len(todo) >= ORT_MIN_IMAGES and model.freeze_encoders else None
    run = run or _torch_image_runner(model)
    bar = progress_bar(total=len(todo), desc="encode images", unit="img", disable=not progress, leave=False)
    # Decoding and masking overlap with encoding: PIL releases the GIL.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(_load_pixels, model, keyed[k]) for k in todo[:batch_size]]
        for start in range(0, len(todo), batch_size):
            keys = todo[start : start + batch_size]
            pixels = torch.stack([f.result() for f in pending])
            pending = [
                pool.submit(_load_pixels, model, keyed[k])
                for k in todo[start + batch_size : start + 2 * batch_size]
            ]
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
    model: DRFModel,
    samples: Sequence[Sample],
    cache: FeatureCache,
    batch_size: int = 32,
    progress: bool = False,
) -> FeatureTable:
    """Features of ``samples`` (disruptions applied), encoding only what the cache lacks."""
    if not samples:
        raise ValueError("no samples to encode")
    model.eval()
    _encode_missing_images(model, cache, samples, batch_size, progress)
    texts = [s.text for s in samples if s.text is not None]
    _encode_missing_texts(model, cache, texts, batch_size * 2, progress)
    n = len(samples)
    image_present = torch.tensor([s.image is not None for s in samples])
    text_present = torch.tensor([s.text is not None for s in samples])
    image = torch.zeros(n, model.image_encoder.dim)
    text = torch.zeros(n, model.text_encoder.dim)
    if bool(image_present.any()):
        image[image_present] = cache.get("image", [key for s in samples if (key := image_key(s)) is not None])
    if bool(text_present.any()):
        text[text_present] = cache.get("text", [text_key(t) for t in texts])
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return FeatureTable(image, text, image_present, text_present, labels)


def encode_padding(model: DRFModel, cache: FeatureCache) -> tuple[Tensor, Tensor]:
    """Features of a blank (black) image and an all-[MASK] text: the paper's padding for methods that cannot
    take a missing modality (section 4.3)."""
    blank = Sample(
        "padding", PADDING_TEXT, Image.new("RGB", image_load_size(model.image_encoder)), 0, ("padding",)
    )
    table = encode_samples(model, [blank], cache)
    return table.image[0], table.text[0]


class CachedSource:
    """Batches from a FeatureTable (frozen encoders)."""

    def __init__(self, table: FeatureTable) -> None:
        if table.labels is None:
            raise ValueError("training and scoring need a labelled feature table")
        self.table = table
        self.labels = table.labels

    def __len__(self) -> int:
        return len(self.table)

    def features(self, index: Tensor) -> FeatureTable:
        return self.table.rows(index)


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

    def features(self, index: Tensor) -> FeatureTable:
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
        return FeatureTable(
            image, text, batch.image_present, batch.text_present, self.labels[index].to(device)
        )
