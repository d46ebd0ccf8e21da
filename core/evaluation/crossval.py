"""Cross-validation over every post of a data set: numbers that hold on unseen posts.

The data set's splits are pooled and dealt into K stratified folds (core/data/folds.py, seeded).  For fold k the
fold is the test set, a stratified ``DEV_FRACTION`` of the other posts is dev (model selection, temperature
scaling and the gated router's gates only) and the rest trains.  Every method is trained clean for every seed, as
in Table 3 (and, with ``regimes`` holding "product", again on damaged posts: core/training/mixing.py), and scored on the fold's posts clean, under the paper's modality-fixed disruption (C, D, C+D) and
under each realistic damage (core/data/damage.py).

Each condition is applied and encoded once for the pooled posts (a post is damaged the same way whichever fold it
is in), so features are computed once and every fold takes its rows: no fold re-encodes anything.  With
``finetune_text`` each fold fine-tunes its own copy of the text encoder on its training posts and encodes every
condition's texts with it (``finetuned``): the two-stage recipe of core/training/finetune.py.  Each result
row carries its ``fold`` (0 .. K-1); a table cell is the mean ± sample std over folds × seeds.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.contracts import MODALITIES
from core.data.damage import damaged_variants
from core.data.folds import DEV_FRACTION, fold_split, pooled, stratified_folds
from core.data.records import Sample
from core.evaluation.config import EvalConfig
from core.evaluation.cv_report import write_cv_report
from core.evaluation.report import EvaluationResults, write_report
from core.evaluation.runs import Conditions, Evaluation
from core.model.drf_model import DRFModel, FeatureTable
from core.progress import progress as progress_bar
from core.training.features import FeatureCache, encode_padding
from core.training.finetune import finetune_text_encoder, finetuned_feature_cache
from core.training.mixing import DamageMix


class CrossValidation(Evaluation):
    """K-fold cross-validation (``config.folds`` >= 2) of the clean-trained regime and, when configured, of the
    product regime (trained on damaged posts too)."""

    def __init__(self, config: EvalConfig, cache_root: str | Path, progress: bool = True) -> None:
        if config.folds < 2:
            raise ValueError("cross-validation needs config.folds >= 2")
        super().__init__(config, cache_root, progress=progress)
        self.posts = pooled(self.dataset)
        self.labels_of_posts = [s.label for s in self.posts]
        self.folds = stratified_folds(self.labels_of_posts, config.folds, config.fold_seed)
        self.fold_sizes: list[dict[str, int]] = []
        self.finetune_seconds = 0.0

    def pooled_samples(self) -> dict[str, list[Sample]]:
        """Every test condition applied to the pooled posts, "clean" first (a post is damaged the same way
        whichever fold it is in)."""
        settings = dict.fromkeys(("C", *self.config.fixed_settings))  # C also picks the gates on dev
        samples = {"clean": list(self.posts)}
        variants = damaged_variants(
            self.posts, self.config.disruption_seed, tuple(settings), self.config.damage
        )
        for name, (damaged, stats) in variants.items():
            self.disruption_stats.update(stats)
            samples[name] = damaged
        return samples

    def pooled_conditions(
        self,
        samples: dict[str, list[Sample]],
        model: DRFModel | None = None,
        cache: FeatureCache | None = None,
    ) -> dict[str, FeatureTable]:
        """Every condition's posts encoded once (what the cache lacks) by ``model`` (default: the frozen one)."""
        return {name: self._encode_samples(posts, model, cache) for name, posts in samples.items()}

    def finetuned(self, fold: int, samples: dict[str, list[Sample]]) -> dict[str, FeatureTable]:
        """The two-stage recipe for ``fold`` (core/training/finetune.py).  Stage one: a copy of the frozen model has
        its text encoder fine-tuned with a linear text classifier on the fold's clean training posts, the fold's dev
        picking the epoch (the test posts are never seen).  Stage two: every condition's texts are encoded by the
        fine-tuned encoder (cached under its own fingerprint; images come from the frozen cache), so every head of
        the fold trains on them as on frozen features."""
        model, _ = self._finetune(fold, "text", self.config.finetune_epochs)
        cache = finetuned_feature_cache(model, self.cache_root, self.cache)
        self.padding = encode_padding(model, cache)  # the padding text of the heads that need one, re-encoded
        return self.pooled_conditions(samples, model, cache)

    def end_to_end(self, fold: int, samples: dict[str, list[Sample]]) -> Conditions:
        """A DRF model fine-tuned end to end on ``fold`` (its text encoder with its head, for the heads' epochs), the
        comparison the two-stage recipe stands in for ("drf-e2e"): kept for ``run``, and the fold's dev and test
        posts under every condition encoded by its own text encoder, to score it on."""
        cfg = self.config
        model, info = self._finetune(fold, "drf", cfg.epochs)
        self._models[("drf-e2e", cfg.seeds[0], "clean", fold)] = (model, info)
        split = fold_split(self.labels_of_posts, self.folds, fold, cfg.fold_seed)
        rows = [*split.dev, *split.test]
        cache = finetuned_feature_cache(model, self.cache_root, self.cache)
        tables = self.pooled_conditions(
            {name: [posts[i] for i in rows] for name, posts in samples.items()}, model, cache
        )
        dev, test = torch.arange(len(split.dev)), torch.arange(len(split.dev), len(rows))
        return self._conditions(tables, dev, dev, test)  # trained already: no training rows are read

    def _finetune(self, fold: int, objective: str, epochs: int) -> tuple[DRFModel, dict[str, Any]]:
        cfg = self.config
        split = fold_split(self.labels_of_posts, self.folds, fold, cfg.fold_seed)
        model = copy.deepcopy(self.base)
        torch.manual_seed(cfg.seeds[0])
        result = finetune_text_encoder(
            model,
            [self.posts[i] for i in split.train],
            [self.posts[i] for i in split.dev],
            cfg.finetune_config(cfg.seeds[0], epochs),
            self.cache,
            layers=cfg.finetune_layers,
            objective=objective,
            progress=self.progress,
        )
        self.finetune_seconds += result.seconds
        info = {
            "best_epoch": result.best_epoch,
            "best_dev_accuracy": result.best_dev_accuracy,
            "train_seconds": result.seconds,
            "history": result.history,
        }
        return model, info

    def fold_conditions(self, tables: dict[str, FeatureTable], fold: int) -> dict[str, Conditions]:
        """The fold's conditions per training regime: the same test tables for both; the product regime trains
        on every variant but C+D (itself a half-half mix of C and D) and selects on one fixed draw of dev."""
        split = fold_split(self.labels_of_posts, self.folds, fold, self.config.fold_seed)
        self.fold_sizes.append({"train": len(split.train), "dev": len(split.dev), "test": len(split.test)})
        train, dev, test = (torch.tensor(ix) for ix in (split.train, split.dev, split.test))
        clean = self._conditions(tables, train, dev, test)
        regimes = {"clean": clean}
        if "product" in self.config.regimes:
            mixed = [name for name in tables if not name.endswith("/C+D")]  # "clean" first
            dev_mix = DamageMix(
                {n: tables[n].rows(dev) for n in mixed}, self.config.product_intact, seed=fold
            )
            regimes["product"] = replace(
                clean,
                dev=dev_mix.fixed(),
                train_variants={n: tables[n].rows(train) for n in mixed},
            )
        return regimes

    def _conditions(
        self, tables: dict[str, FeatureTable], train: torch.Tensor, dev: torch.Tensor, test: torch.Tensor
    ) -> Conditions:
        """The clean regime's conditions from the rows ``train``, ``dev`` and ``test`` of ``tables``."""
        tested = ("clean", *(f"{m}/{s}" for m in MODALITIES for s in self.config.fixed_settings))
        return Conditions(
            tables["clean"].rows(train),
            tables["clean"].rows(dev),
            {name: tables[name].rows(test) for name in (*tested, *self.config.damage)},
            {f"{m}/C": tables[f"{m}/C"].rows(dev) for m in MODALITIES},
        )

    def methods_product(self) -> list[str]:
        """What the product regime trains: DRF and every baseline, on the same damaged posts."""
        return ["drf", *self.config.baselines]

    def methods_finetuned(self) -> list[str]:
        """Methods run only with a fine-tuned text encoder: DRF fine-tuned end to end (on some folds)."""
        return ["drf-e2e"] if self.config.finetune_text and self.config.finetune_e2e_folds else []

    def execute(self) -> None:
        cfg = self.config
        started = time.monotonic()
        samples = self.pooled_samples()
        # Frozen encoders: every fold takes its rows of these.  Fine-tuned: each fold encodes its own.
        tables = {} if cfg.finetune_text else self.pooled_conditions(samples)
        self.timings["encode_seconds"] = self.encode_seconds
        methods = {"clean": self.methods_clean(), "product": self.methods_product()}
        runs = sum(len(methods[regime]) for regime in cfg.regimes) * len(cfg.seeds)
        bar = progress_bar(
            total=cfg.folds * runs + len(cfg.finetune_e2e_folds) * len(self.methods_finetuned()),
            desc="cross-validation runs",
            unit="run",
            disable=not self.progress,
        )
        for fold in range(cfg.folds):
            self.fold = fold
            end_to_end = cfg.finetune_text and fold in cfg.finetune_e2e_folds
            if cfg.finetune_text:
                tables = self.finetuned(fold, samples)
            for regime, conditions in self.fold_conditions(tables, fold).items():
                if regime == "clean" and end_to_end:
                    self.run("drf-e2e", cfg.seeds[0], regime, self.end_to_end(fold, samples))
                    bar.update(1)
                for seed in cfg.seeds:
                    for method in methods[regime]:
                        bar.set_postfix(fold=fold, regime=regime, method=method, seed=seed)
                        self.run(method, seed, regime, conditions)
                        bar.update(1)
            self._models.clear()  # a fold's models are never needed again
        self.fold = None
        bar.close()
        self.timings["encode_seconds"] = self.encode_seconds
        if cfg.finetune_text:
            self.timings["finetune_seconds"] = self.finetune_seconds
        self.timings["total_seconds"] = time.monotonic() - started + self.timings["load_seconds"]

    def outcome(self) -> EvaluationResults:
        outcome = super().outcome()
        return replace(outcome, methods=[*outcome.methods, *self.methods_finetuned()])

    def describe(self) -> dict[str, object]:
        described = super().describe()
        described["crossval"] = {
            "folds": self.config.folds,
            "fold_seed": self.config.fold_seed,
            "dev_fraction": DEV_FRACTION,
            "posts": len(self.posts),
            "label_counts": {
                name: sum(1 for y in self.labels_of_posts if y == i) for i, name in enumerate(self.labels)
            },
            "fold_sizes": self.fold_sizes,
        }
        cfg = self.config
        if cfg.finetune_text:
            layers = "all layers" if cfg.finetune_layers is None else f"top {cfg.finetune_layers} layers"
            described["encoders"] = (
                f"{described['encoders']}; text encoder fine-tuned per fold, two-stage "
                f"({layers}, {cfg.finetune_epochs} epochs on the fold's training posts)"
            )
        return described


def run_evaluation(
    config: EvalConfig, out_dir: str | Path, cache_root: str | Path, progress: bool = True
) -> dict[str, Path]:
    """Run every configured experiment and write the report: cross-validated when ``config.folds`` >= 2, else on
    the data set's own splits (the paper's tables)."""
    if config.folds:
        crossval = CrossValidation(config, cache_root, progress=progress)
        crossval.execute()
        return write_cv_report(crossval.outcome(), out_dir)
    evaluation = Evaluation(config, cache_root, progress=progress)
    evaluation.execute()
    return write_report(evaluation.outcome(), out_dir)
