"""The paper's evaluation on any data set: Tables 1, 3, 4 and Figure 5, with baselines trained the same way.

* Table 3: trained and tested clean.
* Table 1: the clean-trained models tested under modality-fixed disruption (image or text; C, D, C+D).
* Table 4: the same for DRF with one component switched off (core.model.ABLATIONS).
* Figure 5: modality-random disruption with ratio dr in training, dev and test; dr = 0 is the clean run.

Every number is the mean and sample standard deviation over training seeds.  The disruption is drawn once
(``disruption_seed``) so that every method and seed is scored on exactly the same disrupted samples (a paired
comparison).  Model selection uses the dev split only.  Encoders are frozen and features cached
(core/training/features.py), so each run trains only a head.  Outputs (core/evaluation/report.py): ``report.md``, ``results.json``
and ``figure5.png``.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.contracts import MODALITIES
from core.data import Dataset, load_dataset
from core.data.disruption import Setting, disrupt_dataset
from core.drf.head import VARIANTS
from core.encoders.configs import Encoders
from core.evaluation.baselines import HEADS, BaselineHead, Router
from core.evaluation.config import ENCODER_DESCRIPTIONS, EvalConfig
from core.evaluation.report import EvaluationResults, write_report
from core.model.drf_model import DRFModel, FeatureTable, create_model
from core.progress import progress as progress_bar
from core.training.features import (
    CachedSource,
    FeatureCache,
    encode_padding,
    encode_samples,
    feature_cache_for,
)
from core.training.loop import (
    Scorable,
    Trainable,
    classification_scores,
    fit,
    one_thread,
    predict_probabilities,
)

log = logging.getLogger(__name__)


@dataclass
class Conditions:
    """Feature tables for every condition of one training regime: train and dev, and named test sets."""

    train: FeatureTable
    dev: FeatureTable
    tests: dict[str, FeatureTable]


class Evaluation:
    """Runs the configured experiments and collects per-seed scores in ``results``."""

    def __init__(self, config: EvalConfig, cache_root: str | Path, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.timings: dict[str, float] = {}
        started = time.monotonic()
        self.dataset: Dataset = load_dataset(config.data)
        self.labels = list(self.dataset.label_names)
        torch.manual_seed(0)  # random-init encoders (tiny) get the same weights in every run: reproducible
        self.base = create_model(
            config.encoders,
            self.labels,
            dim=config.dim,
            queue_size=config.queue_size,
            encoder_options=config.encoder_options,
        )
        self.encoders = Encoders(
            self.base.encoder_name, self.base.image_encoder, self.base.text_encoder, self.base.encoder_options
        )
        self.cache: FeatureCache = feature_cache_for(self.base, cache_root)
        self.timings["load_seconds"] = time.monotonic() - started
        self.encode_seconds = 0.0
        self.padding = encode_padding(self.base, self.cache)
        self.results: list[dict[str, Any]] = []
        self.quality_auroc: list[dict[str, Any]] = []
        self.disruption_stats: dict[str, Any] = {}
        self._models: dict[tuple[str, int, str], tuple[Trainable, dict[str, Any]]] = {}

    # -- features

    def _encode(self, dataset: Dataset, split: str) -> FeatureTable:
        started = time.monotonic()
        table = encode_samples(self.base, dataset[split], self.cache, progress=self.progress)
        self.encode_seconds += time.monotonic() - started
        return table

    def clean_conditions(self) -> Conditions:
        """Clean train/dev; clean test plus every modality-fixed disruption of the test split."""
        tests = {"clean": self._encode(self.dataset, "test")}
        for modality in MODALITIES:
            for setting in self.config.fixed_settings:
                disrupted, stats = disrupt_dataset(
                    self.dataset, "fixed", setting, self.config.disruption_seed, modality=modality
                )
                name = f"{modality}/{setting}"
                self.disruption_stats[f"fixed {name}"] = {k: dict(v.disrupted) for k, v in stats.items()}
                tests[name] = self._encode(disrupted, "test")
        return Conditions(self._encode(self.dataset, "train"), self._encode(self.dataset, "dev"), tests)

    def random_conditions(self, setting: Setting, dr: float) -> Conditions:
        """Every split disrupted with ratio ``dr`` (training, model selection and test alike)."""
        disrupted, stats = disrupt_dataset(
            self.dataset, "random", setting, self.config.disruption_seed, dr=dr
        )
        self.disruption_stats[f"random {setting} dr={dr:g}"] = {
            k: dict(v.disrupted) for k, v in stats.items()
        }
        return Conditions(
            self._encode(disrupted, "train"),
            self._encode(disrupted, "dev"),
            {"test": self._encode(disrupted, "test")},
        )

    # -- models

    def build(self, method: str, seed: int) -> Trainable:
        """A fresh head, initialised from ``seed``: "drf", "drf-paper", "drf-no-<ablation>" or a baseline head."""
        torch.manual_seed(seed)
        if method in HEADS:
            return BaselineHead(method, self.labels, *self.padding, dim=self.config.dim)
        options: dict[str, Any] = dict(VARIANTS["paper" if method == "drf-paper" else self.config.variant])
        if method.startswith("drf-no-"):
            options[method.removeprefix("drf-no-")] = False
        elif method.startswith("drf-paper-"):
            mechanism = method.removeprefix("drf-paper-")
            options[mechanism] = VARIANTS["paper"][mechanism]
        elif method not in ("drf", "drf-paper"):
            raise ValueError(f"unknown method {method!r}")
        return DRFModel(
            self.encoders, self.labels, dim=self.config.dim, queue_size=self.config.queue_size, **options
        )

    def trained(
        self, method: str, seed: int, regime: str, conditions: Conditions
    ) -> tuple[Scorable, dict[str, Any]]:
        """The model of ``method`` trained on ``conditions`` (baseline heads are kept: the router reuses them)."""
        key = (method, seed, regime)
        if key in self._models:
            return self._models[key]
        if method == "router":
            parts = [
                self.trained(m, seed, regime, conditions)[0] for m in ("concat", "text_only", "image_only")
            ]
            heads = [part for part in parts if isinstance(part, BaselineHead)]
            return Router(*heads), {"best_epoch": 0, "best_dev_accuracy": float("nan"), "train_seconds": 0.0}
        model = self.build(method, seed)
        with one_thread():  # encoding keeps every thread; heads train faster on one
            result = fit(
                model,
                CachedSource(conditions.train),
                CachedSource(conditions.dev),
                self.config.train_config(seed),
            )
        info = {
            "best_epoch": result.best_epoch,
            "best_dev_accuracy": result.best_dev_accuracy,
            "train_seconds": result.seconds,
            "history": result.history,
        }
        if method in HEADS:
            self._models[key] = (model, info)
        return model, info

    def run(self, method: str, seed: int, regime: str, conditions: Conditions) -> None:
        model, info = self.trained(method, seed, regime, conditions)
        for test_name, table in conditions.tests.items():
            test = CachedSource(table)
            predicted = predict_probabilities(model, test).argmax(-1)
            scores = classification_scores(test.labels.numpy(), predicted, len(self.labels))
            self.results.append(
                {"method": method, "seed": seed, "regime": regime, "test": test_name, **scores, **info}
            )
        if isinstance(model, DRFModel) and {"clean", "image/C", "text/C"} <= set(conditions.tests):
            self.quality_auroc.append(
                {"method": method, "seed": seed, **quality_auroc(model, conditions.tests)}
            )

    def methods_clean(self) -> list[str]:
        paper = ["drf-paper"] if self.config.compare_paper and self.config.variant != "paper" else []
        return [
            "drf",
            *paper,
            *(f"drf-paper-{m}" for m in self.config.mechanisms),
            *(f"drf-no-{a}" for a in self.config.ablations),
            *self.config.baselines,
        ]

    def execute(self) -> None:
        cfg = self.config
        started = time.monotonic()
        clean = self.clean_conditions()
        total = len(cfg.seeds) * (
            len(self.methods_clean()) + len(cfg.random_settings) * len(cfg.ratios) * len(cfg.random_methods)
        )
        bar = progress_bar(total=total, desc="evaluation runs", unit="run", disable=not self.progress)
        for method in self.methods_clean():
            for seed in cfg.seeds:
                bar.set_postfix(method=method, seed=seed)
                self.run(method, seed, "clean", clean)
                bar.update(1)
        for setting in cfg.random_settings:
            for dr in cfg.ratios:
                conditions = self.random_conditions(setting, dr)
                for method in cfg.random_methods:
                    for seed in cfg.seeds:
                        bar.set_postfix(method=method, setting=setting, dr=dr, seed=seed)
                        self.run(method, seed, f"random {setting} dr={dr:g}", conditions)
                        bar.update(1)
        bar.close()
        self.timings["encode_seconds"] = self.encode_seconds
        self.timings["total_seconds"] = time.monotonic() - started + self.timings["load_seconds"]

    # -- output

    def outcome(self) -> EvaluationResults:
        """The results as plain data, for the report."""
        return EvaluationResults(self.describe(), self.results, self.quality_auroc, self.methods_clean())

    def describe(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "data": {
                "spec": self.config.data,
                "name": ds.name,
                "sizes": ds.sizes(),
                "label_counts": {s: ds.label_counts(s) for s in ds.splits},
                "attribution": ds.meta.get("attribution"),
            },
            "encoders": ENCODER_DESCRIPTIONS.get(self.config.encoders, self.config.encoders),
            "config": self.config.to_dict(),
            "disruption": self.disruption_stats,
            "timings": self.timings,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


# ----------------------------------------------------------------------------------------- quality scores


def auroc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Probability that a random ``positive`` scores above a random ``negative`` (ties count half)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs at least one score on each side")
    ranks = _ranks(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = values.argsort(kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1)
    unique, inverse = np.unique(values, return_inverse=True)
    if unique.size != values.size:
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / np.bincount(inverse))[inverse]
    return ranks


@torch.no_grad()
def quality_auroc(model: DRFModel, tests: dict[str, FeatureTable]) -> dict[str, float]:
    """How well the published quality separates intact from corrupted inputs: AUROC of q on the clean test
    split (intact) against the same posts with that modality corrupted (tests "image/C" and "text/C")."""
    model.train(False)

    def log_q(table: FeatureTable) -> dict[str, np.ndarray]:
        """log q of each present modality of a table, from one forward pass."""
        out = model.forward_features(table)
        return {
            "image": out.log_quality_image[table.image_present].float().numpy(),
            "text": out.log_quality_text[table.text_present].float().numpy(),
        }

    clean = log_q(tests["clean"])
    return {m: auroc(clean[m], log_q(tests[f"{m}/C"])[m]) for m in MODALITIES}


def run_evaluation(
    config: EvalConfig, out_dir: str | Path, cache_root: str | Path, progress: bool = True
) -> dict[str, Path]:
    """Run every configured experiment and write the report."""
    evaluation = Evaluation(config, cache_root, progress=progress)
    evaluation.execute()
    return write_report(evaluation.outcome(), out_dir)
