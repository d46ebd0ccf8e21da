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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.contracts import MODALITIES
from core.data import Dataset, Sample, load_dataset
from core.data.damage import damage_samples
from core.data.disruption import Setting, disrupt_dataset, modality_fixed
from core.drf.head import VARIANTS
from core.encoders.configs import Encoders, training_options
from core.evaluation.baselines import HEADS, BaselineHead, GatedRouter, Router, choose_gates
from core.evaluation.config import ENCODER_DESCRIPTIONS, EvalConfig
from core.evaluation.report import EvaluationResults
from core.evaluation.scoring import auroc, calibrated_scores, damage_auroc
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
    FeatureSource,
    Scorable,
    Trainable,
    fit,
    one_thread,
)
from core.training.mixing import DamageMix

log = logging.getLogger(__name__)


@dataclass
class Conditions:
    """Feature tables for every condition of one training regime: train and dev, and named test sets."""

    train: FeatureTable
    dev: FeatureTable
    tests: dict[str, FeatureTable]
    # The dev posts with one modality corrupted by the paper's protocol (C): what the gated router's gates are
    # picked on, besides the clean dev posts.
    dev_damaged: dict[str, FeatureTable] = field(default_factory=dict)
    # The product regime: the training posts' damaged variants (with "clean"), mixed per batch (DamageMix).
    train_variants: dict[str, FeatureTable] | None = None


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
            encoder_options={**training_options(config.encoders, config.tweets), **config.encoder_options},
        )
        self.encoders = Encoders(
            self.base.encoder_name, self.base.image_encoder, self.base.text_encoder, self.base.encoder_options
        )
        self.cache_root = Path(cache_root)
        self.cache: FeatureCache = feature_cache_for(self.base, cache_root)
        self.timings["load_seconds"] = time.monotonic() - started
        self.encode_seconds = 0.0
        self.padding = encode_padding(self.base, self.cache)
        self.results: list[dict[str, Any]] = []
        self.quality_auroc: list[dict[str, Any]] = []
        self.damage_auroc: list[dict[str, Any]] = []
        self.fold: int | None = None  # the fold being run in cross-validation (core/evaluation/crossval.py)
        self.disruption_stats: dict[str, Any] = {}
        self._models: dict[tuple[str, int, str, int | None], tuple[Trainable, dict[str, Any]]] = {}

    # -- features

    def _encode(self, dataset: Dataset, split: str) -> FeatureTable:
        return self._encode_samples(dataset[split])

    def _encode_samples(
        self, samples: Sequence[Sample], model: DRFModel | None = None, cache: FeatureCache | None = None
    ) -> FeatureTable:
        """Features of ``samples`` by ``model`` into ``cache`` (default: the frozen encoders and their cache)."""
        started = time.monotonic()
        table = encode_samples(model or self.base, samples, cache or self.cache, progress=self.progress)
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
        for condition in self.config.damage:
            damaged, damage = damage_samples(self.dataset["test"], condition, self.config.disruption_seed)
            self.disruption_stats[f"damage {condition}"] = damage.to_dict()
            tests[condition] = self._encode_samples(damaged)
        dev_damaged = {}
        if "gated_router" in self.config.baselines:
            for modality in MODALITIES:
                corrupted, _ = modality_fixed(self.dataset["dev"], modality, "C", self.config.disruption_seed)
                dev_damaged[f"{modality}/C"] = self._encode_samples(corrupted)
        return Conditions(
            self._encode(self.dataset, "train"), self._encode(self.dataset, "dev"), tests, dev_damaged
        )

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
        """The model of ``method`` trained on ``conditions`` (baseline heads and DRF are kept: the routers reuse
        them); a cross-validation run keys them by fold too."""
        key = (method, seed, regime, self.fold)
        if key in self._models:
            return self._models[key]
        composed = {"best_epoch": 0, "best_dev_accuracy": float("nan"), "train_seconds": 0.0}
        if method in ("router", "gated_router"):
            parts = [
                self.trained(m, seed, regime, conditions)[0] for m in ("concat", "text_only", "image_only")
            ]
            heads = [part for part in parts if isinstance(part, BaselineHead)]
            router = Router(*heads)
            if method == "router":
                return router, composed
            drf = self.trained("drf", seed, regime, conditions)[0]
            assert isinstance(drf, DRFModel)
            gated = GatedRouter(drf, router)
            gated.gate_image, gated.gate_text = choose_gates(
                gated, [conditions.dev, *conditions.dev_damaged.values()]
            )
            return gated, {**composed, "gate_image": gated.gate_image, "gate_text": gated.gate_text}
        model = self.build(method, seed)
        train: FeatureSource = (
            DamageMix(conditions.train_variants, self.config.product_intact, seed)
            if conditions.train_variants
            else CachedSource(conditions.train)
        )
        with one_thread():  # encoding keeps every thread; heads train faster on one
            result = fit(model, train, CachedSource(conditions.dev), self.config.train_config(seed))
        info = {
            "best_epoch": result.best_epoch,
            "best_dev_accuracy": result.best_dev_accuracy,
            "train_seconds": result.seconds,
            "history": result.history,
        }
        if method in HEADS or method == "drf":
            self._models[key] = (model, info)
        return model, info

    def run(self, method: str, seed: int, regime: str, conditions: Conditions) -> None:
        """Score one method on every test condition (``fold`` None outside cross-validation); DRF models also get
        their quality AUROC against the paper's corruption (C) and against every other damaged condition."""
        model, info = self.trained(method, seed, regime, conditions)
        scores = calibrated_scores(
            model, conditions.dev, conditions.tests, len(self.labels), self.config.reliability_tests
        )
        history = {"history": info["history"]} if "history" in info else {}
        info = {k: v for k, v in info.items() if k != "history"}
        for position, (test_name, test_scores) in enumerate(scores.items()):
            self.results.append(
                {
                    "method": method,
                    "seed": seed,
                    "fold": self.fold,
                    "regime": regime,
                    "test": test_name,
                    **test_scores,
                    **info,
                    **(history if position == 0 else {}),  # once per run, on its first test condition
                }
            )
        if not isinstance(model, DRFModel) or "clean" not in conditions.tests:
            return
        if {"image/C", "text/C"} <= set(conditions.tests):
            self.quality_auroc.append(
                {
                    "method": method,
                    "seed": seed,
                    "fold": self.fold,
                    "regime": regime,
                    **quality_auroc(model, conditions.tests),
                }
            )
        for test_name, value in damage_auroc(model, conditions.tests).items():
            self.damage_auroc.append(
                {
                    "method": method,
                    "seed": seed,
                    "fold": self.fold,
                    "regime": regime,
                    "test": test_name,
                    "auroc": value,
                }
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
        return EvaluationResults(
            self.describe(), self.results, self.quality_auroc, self.methods_clean(), self.damage_auroc
        )

    def _encoders_description(self) -> str:
        """What the report's header says of the encoders, options that change the features included."""
        options = self.base.encoder_options
        described = ENCODER_DESCRIPTIONS.get(self.config.encoders, self.config.encoders)
        if options.get("image_model", "lite0") != "lite0":
            described = described.replace(
                "EfficientNet-Lite0", f"EfficientNet-{options['image_model'].title()}"
            )
        return described + ("; texts normalised as tweets" if options.get("tweets") else "")

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
            "encoders": self._encoders_description(),
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
