"""Training the DRF model (paper section 4.2): AdamW with two learning rates, cosine decay, dev-only model selection.

``fit`` trains any ``Trainable`` (the DRF model or a baseline head) on batches of pre-projection features from a
``FeatureSource`` (core/training/features.py: cached features, or samples encoded on the fly for fine-tuning;
core/training/finetune.py: cached image features with texts encoded on the fly, ``--finetune text``).

Training is resumable: after every epoch a state file holds weights, optimizer, scheduler, RNG, history and the best
dev state, so an interrupted run continued with ``resume=True`` ends in the same state as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from core.files import torch_save_atomically
from core.model.drf_model import DRFModel, FeatureTable
from core.progress import progress as progress_bar
from core.training.calibration import fit_temperature

log = logging.getLogger(__name__)


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


class Scorable(Protocol):
    """What ``predict_probabilities`` runs: a model on pre-projection features (a trained head or a router)."""

    def forward_features(self, features: FeatureTable, labels: Tensor | None = None) -> Any:
        """An output with .logits and, given labels, .loss."""

    def train(self, mode: bool = True) -> Any: ...

    def state_dict(self) -> dict[str, Tensor]: ...


class Trainable(Scorable, Protocol):
    """What ``fit`` trains: the DRF model or a baseline head."""

    def parameter_groups(self, encoder_lr: float, head_lr: float) -> list[dict[str, Any]]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> Any: ...


class FeatureSource(Protocol):
    """Rows of pre-projection features for index batches, with their labels."""

    labels: Tensor

    def __len__(self) -> int: ...

    def features(self, index: Tensor) -> FeatureTable: ...  # labelled rows


def _device_of(model: Scorable) -> torch.device:
    return next(iter(model.state_dict().values())).device


@torch.no_grad()
def predict_probabilities(model: Scorable, source: FeatureSource, batch_size: int = 256) -> np.ndarray:
    """Class probabilities [n, S] in eval mode (the caller's train/eval mode is restored)."""
    was_training = getattr(model, "training", False)
    model.train(False)
    device = _device_of(model)
    out = []
    for index in torch.arange(len(source)).split(batch_size):
        logits = model.forward_features(source.features(index).to(device)).logits
        out.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_logits(
    model: Scorable, source: FeatureSource, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, S] in eval mode, and [n] bool: the row had a modality (else its logits are only the bias)."""
    was_training = getattr(model, "training", False)
    model.train(False)
    device = _device_of(model)
    logits, present = [], []
    for index in torch.arange(len(source)).split(batch_size):
        features = source.features(index)
        logits.append(model.forward_features(features.to(device)).logits.float().cpu())
        present.append((features.image_present | features.text_present).cpu())
    model.train(was_training)
    if not logits:
        return np.zeros((0, _num_classes(model)), dtype=np.float32), np.zeros(0, dtype=bool)
    return torch.cat(logits).numpy(), torch.cat(present).numpy()


def calibrate_temperature(model: DRFModel, dev: FeatureSource) -> float:
    """Temperature scaling: fit T on ``dev`` (rows with a modality; an abstention publishes no probabilities),
    store it as ``model.calibration_temperature`` (saved with the checkpoint) and return it."""
    logits, present = predict_logits(model, dev)
    temperature = fit_temperature(logits[present], dev.labels.numpy()[present])
    model.calibration_temperature = temperature
    return temperature


def classification_scores(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and support-weighted F1 (the paper's ACC/F1), in percent."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if labels.shape != predicted.shape or labels.size == 0:
        raise ValueError(
            f"need equally long, non-empty label arrays, got {labels.shape} and {predicted.shape}"
        )
    f1s, support = [], []
    for c in range(num_classes):
        tp = int(np.sum((predicted == c) & (labels == c)))
        fp = int(np.sum((predicted == c) & (labels != c)))
        fn = int(np.sum((predicted != c) & (labels == c)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        support.append(int(np.sum(labels == c)))
    weighted_f1 = float(np.dot(f1s, support) / max(1, sum(support)))
    return {"accuracy": 100.0 * float(np.mean(labels == predicted)), "weighted_f1": 100.0 * weighted_f1}


def score(model: Scorable, source: FeatureSource, num_classes: int) -> dict[str, float]:
    probabilities = predict_probabilities(model, source)
    return classification_scores(source.labels.numpy(), probabilities.argmax(-1), num_classes)


@dataclass
class TrainResult:
    """What a run did; ``model`` holds the best-dev-accuracy weights when it returns."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_dev_accuracy: float = -1.0
    seconds: float = 0.0


def _num_classes(model: Scorable) -> int:
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
    # x86 CPUs handle far slower. Flushing them to zero changes nothing measurable and speeds a CPU epoch up. It is
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
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    run = _Run(model, config, steps_per_epoch, Path(state_path) if state_path is not None else None)
    run.identity = {"config": config.to_dict(), "train_size": len(train), "dev_size": len(dev)}
    if resume:
        run.resume()
    else:
        torch.manual_seed(config.seed)
    started = time.monotonic()
    bar = progress_bar(
        total=config.epochs * steps_per_epoch,
        desc=description,
        unit="step",
        disable=not progress,
        leave=False,
    )
    bar.update(run.start_epoch * steps_per_epoch)
    for epoch in range(run.start_epoch, config.epochs):
        losses, admitted = run.train_epoch(train, epoch, bar)
        record = run.evaluate(dev, epoch, losses, admitted)
        # Shown in the bar's next line (on a terminal at once; off one at most every 10 s, core.progress), so a
        # run of many short epochs does not log a line each; the history has every epoch.
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", dev_acc=f"{record['dev_accuracy']:.1f}")
        log.debug(
            "%s epoch %d/%d: loss %.4f, dev accuracy %.2f",
            description,
            epoch + 1,
            config.epochs,
            record["train_loss"],
            record["dev_accuracy"],
        )
        run.save(epoch)
    bar.close()
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.train(False)
    run.result.seconds = time.monotonic() - started
    return run.result


class _Run:
    """One training run's moving parts (optimiser, schedule, best weights, saved state), one method per step."""

    def __init__(
        self, model: Trainable, config: TrainConfig, steps_per_epoch: int, state_file: Path | None
    ) -> None:
        self.model, self.config, self.state_file = model, config, state_file
        self.optimizer = torch.optim.AdamW(
            model.parameter_groups(config.encoder_lr, config.head_lr), weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.epochs * steps_per_epoch, eta_min=config.min_lr
        )
        self.result = TrainResult()
        self.best_state: dict[str, Tensor] | None = None
        self.start_epoch = 0
        self.identity: dict[str, Any] = {}
        self.device = _device_of(model)
        self.num_classes = _num_classes(model)

    def resume(self) -> None:
        """Continue from the state file, which must have been written by a run of the same configuration."""
        if self.state_file is None or not self.state_file.is_file():
            raise TrainingError(f"cannot resume: no training state at {self.state_file}")
        state = _load_state(self.state_file)
        if state["identity"] != self.identity:
            raise TrainingError(
                f"cannot resume from {self.state_file}: it was written for {state['identity']}, "
                f"this run is {self.identity}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.best_state = state["best"]
        self.result = TrainResult(
            list(state["history"]), int(state["best_epoch"]), float(state["best_dev_accuracy"])
        )

    def train_epoch(
        self, train: FeatureSource, epoch: int, bar: Any
    ) -> tuple[list[float], dict[str, list[int]]]:
        """One pass over ``train`` in this epoch's seeded order; the losses, and per modality the features the
        queues accepted and were offered."""
        model, config = self.model, self.config
        model.train(True)
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        )
        after_step = getattr(model, "update_queues", None)
        losses: list[float] = []
        admitted = {"image": [0, 0], "text": [0, 0]}  # accepted, offered (present) features this epoch
        for index in order.split(config.batch_size):
            batch = train.features(index).to(self.device)
            out = model.forward_features(batch, labels=batch.labels)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if after_step is not None:
                accepted = after_step(out)
                for name, mask, present in zip(
                    admitted, accepted, (out.image_present, out.text_present), strict=True
                ):
                    admitted[name][0] += int(mask.sum())
                    admitted[name][1] += int(present.sum())
            losses.append(float(out.loss.detach()))
            bar.update(1)
        return losses, admitted

    def evaluate(
        self, dev: FeatureSource, epoch: int, losses: list[float], admitted: dict[str, list[int]]
    ) -> dict[str, float]:
        """Score dev, record the epoch in the history, and keep the weights if they are the best so far."""
        dev_scores = score(self.model, dev, self.num_classes)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "dev_accuracy": dev_scores["accuracy"],
        }
        diagnose = getattr(self.model, "diagnostics", None)
        if diagnose is not None:
            record.update({f"acceptance_{k}": a / max(1, n) for k, (a, n) in admitted.items()})
            # Dev features as scoring sees them: a source that encodes on the fly (fine-tuning) does so in eval
            # mode, without an autograd graph over every dev post (train_epoch sets train mode again).
            self.model.train(False)
            with torch.no_grad():
                dev_features = dev.features(torch.arange(len(dev)))
            record.update(diagnose(dev_features.to(self.device)))
        self.result.history.append(record)
        if dev_scores["accuracy"] > self.result.best_dev_accuracy:
            self.result.best_dev_accuracy, self.result.best_epoch = dev_scores["accuracy"], epoch + 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return record

    def save(self, epoch: int) -> None:
        """The full training state after ``epoch``, when the run has a state file."""
        if self.state_file is None:
            return
        state = {
            "identity": self.identity,
            "epoch": epoch + 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "best": self.best_state,
            "best_epoch": self.result.best_epoch,
            "best_dev_accuracy": self.result.best_dev_accuracy,
            "history": self.result.history,
        }
        torch_save_atomically(state, self.state_file)


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
    except Exception as exc:  # a damaged state file, whatever the damage, is reported, not crashed on
        raise TrainingError(f"training state {path} is unreadable ({exc}); delete it to start over") from exc
