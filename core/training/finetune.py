"""Fine-tuning the text encoder (``postsense train --finetune text``), the image encoder frozen and cached.

The literature reaches its MVSA numbers by fine-tuning the text encoder; with both encoders frozen the model stays
near 70 %. Here only the text encoder trains (all of it, or its top N transformer layers), with its own learning
rate beside the head's (``TrainConfig.encoder_lr``, ``FINETUNE_ENCODER_LR`` by default on the command line):

* ``TextFinetuneSource`` is the ``FeatureSource`` ``fit`` draws from: image features come from the feature cache
  (the image encoder is frozen, so each image is encoded once, when the source is made, never per epoch), texts are
  tokenised and encoded per batch, with gradient in training and without it when scored (eval mode, no_grad).
* ``finetune_text_encoder`` is the library entry point and stage one of the **two-stage recipe**: fine-tune on a
  fold's training posts (dev for model selection only), leaving the model with the best dev epoch's weights and its
  text encoder frozen again. The objective is the DRF model itself (end to end; ``--finetune-objective drf``) or a
  linear classifier on the text features (``TextClassifier``; the default of ``train --finetune text`` and
  cross-validation's stage one: with a fresh DRF head, two epochs at batch 32 left DRF at the majority class on
  dev, 59.4 %). Stage two: its fingerprint has changed with its text weights
  (``core.training.features.encoder_fingerprint``), so ``finetuned_feature_cache`` gives a cache that encodes and
  keeps texts under the new fingerprint while reading images from the cache they were already in; the fold's
  ``encode_samples`` tables then train every head from cached features, as with frozen encoders.

Nothing goes stale: a cached text feature is keyed by the weights that encoded it, and the scoring of dev and test
after fine-tuning encodes texts with the fine-tuned encoder (live, or into the new fingerprint's cache).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.data.records import Sample
from core.encoders.base import TextEncoder
from core.encoders.sessions import served_by_onnx
from core.files import digest_weights
from core.model.drf_model import DRFModel, FeatureTable
from core.training.features import FeatureCache, _encode_missing_images, feature_cache_for, image_key
from core.training.loop import Trainable, TrainConfig, TrainingError, TrainResult, fit

#: Encoder learning rate for fine-tuning the text encoder (BERT-family fine-tuning uses 2e-5 to 5e-5).
FINETUNE_ENCODER_LR = 3e-5
#: Stage one of the two-stage recipe (a linear text classifier): BERT-style fine-tuning, 3 epochs at batch 32, the
#: classifier at the CPU heads' rate (core.training.loop.CPU_TRAIN).
FINETUNE_TEXT = TrainConfig(epochs=3, batch_size=32, encoder_lr=FINETUNE_ENCODER_LR, head_lr=1e-3)
#: Texts per text-encoder call when a source encodes many at once without gradient (dev and test scoring).
TEXT_CHUNK = 64


def text_encoder_layers(encoder: TextEncoder) -> list[nn.Module] | None:
    """The transformer layers of a text encoder, bottom to top, or None when it has none (the tiny encoder).

    Hugging Face BERT-family models (MiniLM, BERT: ``model.encoder.layer``) and DistilBERT
    (``model.transformer.layer``)."""
    network = getattr(encoder, "model", None)
    for path in (("encoder", "layer"), ("transformer", "layer")):
        found: object = network
        for name in path:
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    return None


def trainable_text_modules(model: DRFModel, layers: int | None = None) -> list[nn.Module]:
    """What of the text encoder trains: all of it (``layers=None``), its top ``layers`` transformer layers, or
    nothing (``layers=0``). An encoder without layers (tiny) trains whole for any ``layers`` but 0."""
    if layers is not None and layers < 0:
        raise ValueError(f"the number of text encoder layers to fine-tune must be >= 0, got {layers}")
    if layers == 0:
        return []
    blocks = text_encoder_layers(model.text_encoder)
    if layers is None or blocks is None:
        return [model.text_encoder]
    if layers > len(blocks):
        raise ValueError(f"the text encoder has {len(blocks)} layers; cannot fine-tune the top {layers}")
    return blocks[len(blocks) - layers :]


def enable_text_finetuning(model: DRFModel, layers: int | None = None) -> list[nn.Module]:
    """Make ``model``'s text encoder (or its top ``layers`` layers) trainable, the image encoder frozen; returns
    the trained modules. ``model.text_finetune`` records it (kept in the checkpoint's configuration)."""
    encoder = model.text_encoder
    if served_by_onnx(getattr(encoder, "runtime", "torch"), getattr(encoder, "precision", "fp32")):
        # The ONNX switch would score dev from an export of the weights it first saw, stale after the first step.
        raise ValueError(
            "fine-tuning needs the text encoder's torch runtime at fp32 (not ONNX Runtime, not int8)"
        )
    if getattr(encoder, "model", True) is None:
        raise ValueError("an inference-only text encoder has no torch weights to fine-tune")
    modules = trainable_text_modules(model, layers)
    model.train_text_modules(modules)
    if modules:
        model.text_finetune = {"layers": "all" if layers is None else layers}
    return modules


def weights_digest(module: nn.Module) -> str:
    """A hash of a module's weights (the image encoder's, to show fine-tuning left it untouched)."""
    digest = hashlib.sha256()
    digest_weights(digest, module.state_dict().items())
    return digest.hexdigest()[:20]


class TextFinetuneSource:
    """Batches for fine-tuning the text encoder: cached image features, texts encoded per batch.

    The images are encoded into ``image_cache`` (what it lacks) when the source is made; ``features(index)`` then
    tokenises and encodes the batch's texts with the model's text encoder: with an autograd graph when the text
    encoder trains and gradient is on (``fit``'s steps), without in eval mode or under no_grad (scoring).
    ``image_cache`` must belong to the model's image encoder: ``feature_cache_for(model, root)`` taken before
    fine-tuning changes the text weights (``finetune_text_encoder`` checks that the image weights did not change).
    """

    def __init__(
        self,
        model: DRFModel,
        samples: Sequence[Sample],
        image_cache: FeatureCache,
        batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        if not samples:
            raise ValueError("no samples")
        self.model = model
        self.texts = [s.text for s in samples]
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        self.image_present = torch.tensor([s.image is not None for s in samples])
        self.text_present = torch.tensor([t is not None for t in self.texts])
        was_training = model.training
        model.eval()
        try:
            _encode_missing_images(model, image_cache, samples, batch_size, progress)
        finally:
            model.train(was_training)
        self.image = torch.zeros(len(samples), model.image_encoder.dim)
        keys = [key for s in samples if (key := image_key(s)) is not None]
        if keys:
            self.image[self.image_present] = image_cache.get("image", keys)

    def __len__(self) -> int:
        return len(self.texts)

    def features(self, index: Tensor) -> FeatureTable:
        model = self.model
        device = next(model.parameters()).device
        rows = index.tolist()
        present = self.text_present[index]
        texts = [t for i in rows if (t := self.texts[i]) is not None]
        text = torch.zeros(len(rows), model.text_encoder.dim, device=device)
        if texts:
            encoded = []
            for start in range(0, len(texts), TEXT_CHUNK):
                inputs = model.text_encoder.tokenize(texts[start : start + TEXT_CHUNK])
                encoded.append(model.encode_texts({k: v.to(device) for k, v in inputs.items()}))
            features = torch.cat(encoded)
            text = text.to(features.dtype).index_copy(0, present.to(device).nonzero().squeeze(1), features)
        return FeatureTable(
            self.image[index].to(device),
            text,
            self.image_present[index].to(device),
            present.to(device),
            self.labels[index].to(device),
        )


class FinetunedFeatureCache(FeatureCache):
    """Stage two's cache: texts in the fine-tuned model's own folder (its new fingerprint), images read from (and
    written to) the cache of the unchanged image encoder, so no image is encoded again after fine-tuning."""

    def __init__(self, image: FeatureCache, text: FeatureCache) -> None:
        # No folder of its own (FeatureCache.__init__ is not called): every call goes to one of the two caches.
        self.image, self.text = image, text
        self.directory = text.directory
        self._rows = {}

    def _for(self, modality: str) -> FeatureCache:
        return self.image if modality == "image" else self.text

    def missing(self, modality: str, keys: Sequence[str]) -> list[str]:
        return self._for(modality).missing(modality, keys)

    def get(self, modality: str, keys: Sequence[str]) -> Tensor:
        return self._for(modality).get(modality, keys)

    def put(self, modality: str, keys: Sequence[str], features: Tensor) -> None:
        self._for(modality).put(modality, keys, features)


def finetuned_feature_cache(model: DRFModel, root: str | Path, image_cache: FeatureCache) -> FeatureCache:
    """The cache for a fine-tuned ``model``: texts under its fingerprint in ``root``, images from ``image_cache``
    (the cache taken before fine-tuning: ``finetune_text_encoder`` left the image encoder's weights as they were)."""
    return FinetunedFeatureCache(image_cache, feature_cache_for(model, root))


@dataclass
class TextClassifierOutput:
    logits: Tensor  # [B, S]
    loss: Tensor | None = None  # cross-entropy over the rows with a text, given labels


class TextClassifier(nn.Module):
    """A DRF model's text encoder with a linear classifier on its features: the objective of stage one of the
    two-stage recipe (``objective="text"``), the usual way a BERT-family encoder is fine-tuned for a task.

    ``fit`` trains it from ``TextFinetuneSource`` batches; the loss counts only the posts that have a text. The text
    encoder is the model's own, so the model holds the fine-tuned weights afterwards; the DRF head is not trained.
    """

    def __init__(self, model: DRFModel) -> None:
        super().__init__()
        self.model = model
        self.labels = model.labels
        self.classifier = nn.Linear(model.text_encoder.dim, len(model.labels))

    def parameter_groups(self, encoder_lr: float, head_lr: float) -> list[dict[str, Any]]:
        encoder = [p for p in self.model.text_encoder.parameters() if p.requires_grad]
        groups = [
            {"params": encoder, "lr": encoder_lr},
            {"params": list(self.classifier.parameters()), "lr": head_lr},
        ]
        return [g for g in groups if g["params"]]

    def forward_features(self, features: FeatureTable, labels: Tensor | None = None) -> TextClassifierOutput:
        logits = self.classifier(features.text)
        if labels is None:
            return TextClassifierOutput(logits)
        present = features.text_present.to(torch.bool)
        rows = logits[present].float()
        loss = F.cross_entropy(rows, labels[present].long()) if len(rows) else logits.sum() * 0.0
        return TextClassifierOutput(logits, loss)


#: What stage one trains the text encoder with: the DRF model itself (end to end) or a linear text classifier.
OBJECTIVES = ("drf", "text")


def finetune_text_encoder(
    model: DRFModel,
    train_samples: Sequence[Sample],
    dev_samples: Sequence[Sample],
    config: TrainConfig,
    image_cache: FeatureCache,
    *,
    layers: int | None = None,
    objective: str = "drf",
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Fine-tune ``model``'s text encoder (all of it, or its top ``layers`` layers) with its head, on
    ``train_samples`` only; ``dev_samples`` select the epoch (``fit``'s best dev accuracy), never test.

    Stage one of the two-stage recipe, one call per cross-validation fold (its training posts, its dev slice).
    ``image_cache``: ``feature_cache_for(model, root)`` taken *before* this call (the frozen run's cache, which has
    the images already). The learning rates are ``config.encoder_lr`` (text encoder; ``FINETUNE_ENCODER_LR`` is
    a sensible value) and ``config.head_lr``; the images are encoded once, whatever the number of epochs.

    ``objective``: "drf" trains the text encoder with the model's DRF head (end to end); "text" with a linear
    classifier on the text features alone (``TextClassifier``), leaving the DRF head untrained, for heads that are
    trained afterwards on the fine-tuned features.

    On return the model holds the best dev epoch's weights (head and text encoder), in eval mode, its text encoder
    frozen again, and ``encoder_fingerprint(model)`` is new. Stage two: ``cache = finetuned_feature_cache(model,
    root, image_cache)`` and ``encode_samples(model, samples, cache)`` give the fold's tables (texts encoded by the
    fine-tuned encoder and cached under the new fingerprint, images from the cache) for every head.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown fine-tuning objective {objective!r}; known: {list(OBJECTIVES)}")
    image_before = weights_digest(model.image_encoder)
    enable_text_finetuning(model, layers)
    try:
        train = TextFinetuneSource(model, train_samples, image_cache, progress=progress)
        dev = TextFinetuneSource(model, dev_samples, image_cache, progress=progress)
        trained: Trainable = model if objective == "drf" else TextClassifier(model)
        result = fit(
            trained,
            train,
            dev,
            config,
            state_path,
            resume=resume,
            progress=progress,
            description="finetune text",
        )
    finally:
        model.train_text_modules([])
        model.eval()
    if weights_digest(model.image_encoder) != image_before:
        raise TrainingError("the image encoder changed while the text encoder was fine-tuned")
    return result


__all__ = [
    "FINETUNE_ENCODER_LR",
    "FINETUNE_TEXT",
    "OBJECTIVES",
    "FinetunedFeatureCache",
    "TextClassifier",
    "TextFinetuneSource",
    "enable_text_finetuning",
    "finetune_text_encoder",
    "finetuned_feature_cache",
    "text_encoder_layers",
    "trainable_text_modules",
    "weights_digest",
]
