"""DRFModel = image/text encoders + learned projections to the DRF width + the DRF head (core/drf/head.py).

``create_model(name, labels, **kw)`` builds one by encoder configuration name, timm style.  The trainer can run the
encoders separately (``encode_images``/``encode_texts`` give pre-projection features) and cache them while the
encoders are frozen, then train from the cache with ``forward_features``.  ``train_text_modules`` fine-tunes the text
encoder (or its top layers) alone, the image encoder staying frozen (core/training/finetune.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.drf.diagnostics import output_diagnostics
from core.drf.distribution import DEFAULT_QUEUE_SIZE, QueueStats
from core.drf.head import DEFAULT_VARIANT, VARIANTS, DRFConfig, DRFHead
from core.drf.output import DRFOutput
from core.encoders.configs import Encoders, create_encoders

DEFAULT_DIM = 768
ABLATIONS = (
    "sample_recovery",
    "distribution_recovery",
    "gaussian_weights",
    "expansion",
    "distribution_constraint",
)


@dataclass
class FeatureTable:
    """Pre-projection features of a list of posts, what ``forward_features`` takes; rows of an absent modality are
    zeros (lambda = 0). ``labels`` are the posts' classes where known (training and evaluation tables); ``intact``
    says, in a training mix of damaged posts (core/training/mixing.py), which rows' image and text are undamaged."""

    image: Tensor  # [n, D_v]
    text: Tensor  # [n, D_t]
    image_present: Tensor  # [n] bool (lambda^v)
    text_present: Tensor  # [n] bool (lambda^t)
    labels: Tensor | None = None  # [n] long
    intact: Tensor | None = None  # [n, 2] bool (image, text); None: every present modality is intact

    def __len__(self) -> int:
        return int(self.image_present.shape[0])

    def rows(self, index: Tensor) -> FeatureTable:
        return FeatureTable(
            self.image[index],
            self.text[index],
            self.image_present[index],
            self.text_present[index],
            None if self.labels is None else self.labels[index],
            None if self.intact is None else self.intact[index],
        )

    def to(self, device: torch.device | str) -> FeatureTable:
        return FeatureTable(
            self.image.to(device),
            self.text.to(device),
            self.image_present.to(device),
            self.text_present.to(device),
            None if self.labels is None else self.labels.to(device),
            None if self.intact is None else self.intact.to(device),
        )


@dataclass
class PreparedBatch:
    """A model-ready batch, built on CPU by the runtime (possibly in worker threads)."""

    pixel_values: Tensor  # [B, 3, H, W] float; rows of missing images are zeros
    image_present: Tensor  # [B] bool (lambda^v)
    text_inputs: dict[str, Tensor]  # tokenizer output for the batch (dynamic padding)
    text_present: Tensor  # [B] bool (lambda^t)

    def __len__(self) -> int:
        return int(self.image_present.shape[0])

    def to(self, device: torch.device | str) -> PreparedBatch:
        non_blocking = torch.device(device).type == "cuda"
        return PreparedBatch(
            pixel_values=self.pixel_values.to(device, non_blocking=non_blocking),
            image_present=self.image_present.to(device),
            text_inputs={k: v.to(device, non_blocking=non_blocking) for k, v in self.text_inputs.items()},
            text_present=self.text_present.to(device),
        )


def _scatter_rows(rows: Tensor | None, present: Tensor, width: int) -> Tensor:
    """[B, width] with the encoded rows where present and zeros elsewhere."""
    if rows is None:
        return torch.zeros(present.shape[0], width, device=present.device)
    out = rows.new_zeros(present.shape[0], width)
    out[present] = rows
    return out


class DRFModel(nn.Module):
    """Encoders, projections W_v, W_t to width d, and the DRF head; ``labels`` name the S sentiment classes."""

    def __init__(
        self,
        encoders: Encoders,
        labels: Sequence[str],
        dim: int = DEFAULT_DIM,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        freeze_encoders: bool = True,
        **head_options: Any,
    ) -> None:
        super().__init__()
        labels = list(labels)
        if (
            len(labels) < 2
            or len(set(labels)) != len(labels)
            or not all(isinstance(x, str) and x for x in labels)
        ):
            raise ValueError(f"labels must be at least two distinct non-empty strings, got {labels}")
        known = {f.name for f in fields(DRFConfig)} - {
            "num_classes",
            "dim",
            "queue_size",
            "image_dim",
            "text_dim",
        }
        unknown = set(head_options) - known
        if unknown:
            raise ValueError(f"unknown DRF options {sorted(unknown)}; known: {sorted(known)}")
        self.labels = labels
        self.encoder_name = encoders.name
        self.encoder_options = dict(encoders.options)
        self.preprocessing = encoders.preprocessing()
        self.image_encoder = encoders.image
        self.text_encoder = encoders.text
        self.image_projection = nn.Linear(encoders.image.dim, dim)
        self.text_projection = nn.Linear(encoders.text.dim, dim)
        # In the "encoder" quality space the queues and converters work at the encoders' widths (0: the width d).
        encoder_space = head_options.get("quality_space", DRFConfig.quality_space) == "encoder"
        self.head = DRFHead(
            DRFConfig(
                num_classes=len(labels),
                dim=dim,
                queue_size=queue_size,
                image_dim=encoders.image.dim if encoder_space else 0,
                text_dim=encoders.text.dim if encoder_space else 0,
                **head_options,
            )
        )
        self.freeze_encoders = freeze_encoders
        # Parts of the frozen text encoder that are trained anyway (``train_text_modules``), and the record of a
        # text fine-tuning (``{"layers": N or "all"}``; kept in config(), so a checkpoint says it was fine-tuned).
        self._trained_text: list[nn.Module] = []
        self.text_finetune: dict[str, Any] | None = None
        # Temperature scaling of the published probabilities (softmax(logits / T)), fitted on dev by the trainer and
        # kept in the checkpoint's payload, not the state dict; None: never fitted (T = 1, probabilities unscaled).
        self.calibration_temperature: float | None = None
        # Inference on CUDA pads each image batch to a power of two (``encode_images``); ``Predictor`` turns it on.
        self.pad_image_batches = False
        for encoder in (self.image_encoder, self.text_encoder):
            encoder.requires_grad_(not freeze_encoders)
        self.train(True)  # nn.Module's default mode, with frozen encoders kept in eval

    def config(self) -> dict[str, Any]:
        """Everything (besides weights) needed to rebuild this model; JSON-serialisable."""
        head = self.head.config.to_dict()
        # Only a fine-tuned model has the key: every other configuration (and version hash) stays what it was.
        finetune = {} if self.text_finetune is None else {"text_finetune": dict(self.text_finetune)}
        return {
            **finetune,
            "encoders": self.encoder_name,
            "encoder_options": self.encoder_options,
            "labels": self.labels,
            "dim": head.pop("dim"),
            "queue_size": head.pop("queue_size"),
            "freeze_encoders": self.freeze_encoders,
            "head": {k: v for k, v in head.items() if k not in ("num_classes", "image_dim", "text_dim")},
            "preprocessing": self.preprocessing,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], pretrained: bool = False) -> DRFModel:
        """Rebuild from ``config()``; with ``pretrained=False`` no encoder weights are loaded (a checkpoint will)."""
        encoders = create_encoders(config["encoders"], pretrained=pretrained, **config["encoder_options"])
        # A checkpoint from before the variants existed lacks their switches: it was trained as the paper's.
        head = {**VARIANTS["paper"], **config["head"]}
        model = cls(
            encoders,
            config["labels"],
            dim=config["dim"],
            queue_size=config["queue_size"],
            freeze_encoders=config["freeze_encoders"],
            **head,
        )
        model.text_finetune = config.get("text_finetune")
        return model

    def train(self, mode: bool = True) -> DRFModel:
        """Frozen encoders stay in eval mode (BatchNorm statistics and dropout of pretrained weights untouched);
        the text modules being fine-tuned (``train_text_modules``) follow ``mode`` (their dropout on in training)."""
        super().train(mode)
        if self.freeze_encoders:
            self.image_encoder.eval()
            self.text_encoder.eval()
            for module in self._trained_text:
                module.train(mode)
        return self

    def train_text_modules(self, modules: Sequence[nn.Module]) -> None:
        """Fine-tune ``modules`` of the frozen text encoder (``[self.text_encoder]``: all of it; ``[]``: freeze it
        again); the image encoder stays frozen. Their parameters get ``requires_grad`` (and so the encoder learning
        rate in ``parameter_groups``), ``encode_texts`` keeps the autograd graph, and they alone of the encoders
        follow train/eval mode. core/training/finetune.py picks the modules (all, or the top N layers)."""
        if not self.freeze_encoders:
            raise ValueError("the encoders are trained whole already (freeze_encoders=False)")
        owned = {id(m) for m in self.text_encoder.modules()}
        if any(id(m) not in owned for m in modules):
            raise ValueError("only modules of the text encoder can be fine-tuned this way")
        self.text_encoder.requires_grad_(False)
        for module in modules:
            module.requires_grad_(True)
        self._trained_text = list(modules)
        self.train(self.training)

    @property
    def text_trainable(self) -> bool:
        """Whether any of the text encoder is being trained (fine-tuned alone, or with ``freeze_encoders=False``)."""
        return not self.freeze_encoders or bool(self._trained_text)

    def parameter_groups(self, encoder_lr: float, head_lr: float) -> list[dict[str, Any]]:
        """Optimiser groups with the paper's two learning rates (encoders vs everything else)."""
        encoder_ids = {id(p) for p in self.image_encoder.parameters()} | {
            id(p) for p in self.text_encoder.parameters()
        }
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) in encoder_ids], "lr": encoder_lr},
            {"params": [p for p in trainable if id(p) not in encoder_ids], "lr": head_lr},
        ]
        return [g for g in groups if g["params"]]

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Pre-projection image features [B, D_v] (no autograd graph when the encoders are frozen).

        With ``pad_image_batches`` (eval mode only) the batch is padded with blank images to the next power of two
        and the padding's rows dropped: on CUDA every new batch size sends each of the encoder's convolutions back
        to cuDNN to choose an algorithm, and the count of present images differs from batch to batch: padded, a run
        meets at most 8 sizes up to 128, not up to 128 of them. Eval-mode rows do not interact, so features change
        only by rounding (the kernels chosen for another size may sum in another order).
        """
        rows = pixel_values.shape[0]
        padded = 1 << max(rows - 1, 0).bit_length()
        if self.pad_image_batches and not self.training and padded > rows:
            blank = pixel_values.new_zeros(padded - rows, *pixel_values.shape[1:])
            return self._encode_image_rows(torch.cat([pixel_values, blank]))[:rows]
        return self._encode_image_rows(pixel_values)

    def _encode_image_rows(self, pixel_values: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            return self.image_encoder(pixel_values)

    def encode_texts(self, text_inputs: Mapping[str, Tensor]) -> Tensor:
        """Pre-projection text features [B, D_t] (with an autograd graph only while the text encoder trains)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable):
            return self.text_encoder(text_inputs)

    def forward_features(
        self, features: FeatureTable, labels: Tensor | None = None, stats: dict[str, QueueStats] | None = None
    ) -> DRFOutput:
        """Projections + head on pre-projection features (e.g. cached from ``encode_images``/``encode_texts``);
        ``labels`` (training: ``features.labels``) add the losses.

        In the "encoder" quality space the head gets the (optionally L2-normalised) encoder features and applies
        the projections itself, to the fusion's inputs only; in the "projected" space it gets W_v f^v, W_t f^t.
        """
        cfg = self.head.config
        dtype = self.image_projection.weight.dtype
        image_features, text_features = features.image.to(dtype), features.text.to(dtype)
        image_present, text_present = features.image_present, features.text_present
        if cfg.normalise_image:
            image_features = F.normalize(image_features, dim=-1)
        if cfg.normalise_text:
            text_features = F.normalize(text_features, dim=-1)
        if cfg.quality_space == "encoder":
            return self.head(
                image_features,
                text_features,
                image_present,
                text_present,
                labels=labels,
                stats=stats,
                projections=(self.image_projection, self.text_projection),
                intact=features.intact,
            )
        f_v = self.image_projection(image_features)
        f_t = self.text_projection(text_features)
        return self.head(
            f_v, f_t, image_present, text_present, labels=labels, stats=stats, intact=features.intact
        )

    def encode_batch(self, batch: PreparedBatch) -> tuple[Tensor, Tensor]:
        """Pre-projection features of a batch; absent modalities are never encoded (their rows are zeros)."""
        image_present = batch.image_present.to(torch.bool)
        text_present = batch.text_present.to(torch.bool)
        image_rows = (
            self.encode_images(batch.pixel_values[image_present]) if bool(image_present.any()) else None
        )
        text_rows = None
        if bool(text_present.any()):
            text_rows = self.encode_texts({k: v[text_present] for k, v in batch.text_inputs.items()})
        return (
            _scatter_rows(image_rows, image_present, self.image_encoder.dim),
            _scatter_rows(text_rows, text_present, self.text_encoder.dim),
        )

    def forward(
        self, batch: PreparedBatch, labels: Tensor | None = None, stats: dict[str, QueueStats] | None = None
    ) -> DRFOutput:
        image_features, text_features = self.encode_batch(batch)
        features = FeatureTable(image_features, text_features, batch.image_present, batch.text_present)
        return self.forward_features(features, labels=labels, stats=stats)

    @torch.no_grad()
    def diagnostics(self, features: FeatureTable) -> dict[str, float]:
        """``core.drf.diagnostics.output_diagnostics`` of an eval-mode pass, plus each queue's fill and sigma."""
        was_training = self.training
        self.train(False)
        out = self.forward_features(features)
        self.train(was_training)
        summary = output_diagnostics(out)
        for name, queue in (("image", self.head.image_queue), ("text", self.head.text_queue)):
            summary[f"queue_fill_{name}"] = len(queue) / queue.capacity
            summary[f"sigma_{name}"] = float(queue.sigma)
        return summary

    def update_queues(self, output: DRFOutput) -> tuple[Tensor, Tensor]:
        """After a training step: enqueue the batch's features that pass rule (13); returns accepted masks."""
        return self.head.update_queues(output)


def create_model(
    name: str,
    labels: Sequence[str],
    *,
    pretrained: bool = True,
    dim: int | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    freeze_encoders: bool = True,
    encoder_options: Mapping[str, Any] | None = None,
    variant: str = DEFAULT_VARIANT,
    **head_options: Any,
) -> DRFModel:
    """Build a DRF model with the named encoder configuration ("offline", "paper" or "tiny").

    ``dim`` defaults to 768 (the paper's width), or the tiny encoders' own width for ``tiny``.
    ``variant`` names the head's mechanisms (core.drf.VARIANTS: "robust", the default, or "paper");
    ``head_options`` are further DRFConfig fields, which win over the variant's: dropout, converter_hidden,
    fusion_hidden, temperature, the ablation switches (see ABLATIONS).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DRF variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    encoders = create_encoders(name, pretrained=pretrained, **dict(encoder_options or {}))
    if dim is None:
        dim = encoders.image.dim if name == "tiny" else DEFAULT_DIM
    return DRFModel(
        encoders,
        labels,
        dim=dim,
        queue_size=queue_size,
        freeze_encoders=freeze_encoders,
        **{**VARIANTS[variant], **head_options},
    )
