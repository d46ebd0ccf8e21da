"""Cross-validation over every post of a data set: numbers that hold on unseen posts.

The data set's splits are pooled and dealt into K stratified folds (core/data/folds.py, seeded).  For fold k the
fold is the test set, a stratified ``DEV_FRACTION`` of the other posts is dev (model selection, temperature
scaling and the gated router's gates only) and the rest trains.  Every method is trained clean for every seed, as
in Table 3 (and, with ``regimes`` holding "product", again on damaged posts: core/training/mixing.py), and scored on the fold's posts clean, under the paper's modality-fixed disruption (C, D, C+D) and
under each realistic damage (core/data/damage.py).

Each condition is applied and encoded once for the pooled posts (a post is damaged the same way whichever fold it
is in), so features are computed once and every fold takes its rows: no fold re-encodes anything.  Each result
row carries its ``fold`` (0 .. K-1); a table cell is the mean ± sample std over folds × seeds.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from core.contracts import MODALITIES
from core.data.damage import damaged_variants
from core.data.folds import DEV_FRACTION, fold_split, pooled, stratified_folds
from core.evaluation.config import EvalConfig
from core.evaluation.cv_report import write_cv_report
from core.evaluation.report import write_report
from core.evaluation.runs import Conditions, Evaluation
from core.model.drf_model import FeatureTable
from core.progress import progress as progress_bar
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

    def pooled_conditions(self) -> dict[str, FeatureTable]:
        """Every test condition applied to the pooled posts, each encoded once (what the cache lacks)."""
        settings = dict.fromkeys(("C", *self.config.fixed_settings))  # C also picks the gates on dev
        tables = {"clean": self._encode_samples(self.posts)}
        variants = damaged_variants(
            self.posts, self.config.disruption_seed, tuple(settings), self.config.damage
        )
        for name, (samples, stats) in variants.items():
            self.disruption_stats.update(stats)
            tables[name] = self._encode_samples(samples)
        return tables

    def fold_conditions(self, tables: dict[str, FeatureTable], fold: int) -> dict[str, Conditions]:
        """The fold's conditions per training regime: the same test tables for both; the product regime trains
        on every variant but C+D (itself a half-half mix of C and D) and selects on one fixed draw of dev."""
        split = fold_split(self.labels_of_posts, self.folds, fold, self.config.fold_seed)
        self.fold_sizes.append({"train": len(split.train), "dev": len(split.dev), "test": len(split.test)})
        train, dev, test = (torch.tensor(ix) for ix in (split.train, split.dev, split.test))
        tested = ("clean", *(f"{m}/{s}" for m in MODALITIES for s in self.config.fixed_settings))
        clean = Conditions(
            tables["clean"].rows(train),
            tables["clean"].rows(dev),
            {name: tables[name].rows(test) for name in (*tested, *self.config.damage)},
            {f"{m}/C": tables[f"{m}/C"].rows(dev) for m in MODALITIES},
        )
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

    def methods_product(self) -> list[str]:
        """What the product regime trains: DRF and every baseline, on the same damaged posts."""
        return ["drf", *self.config.baselines]

    def execute(self) -> None:
        cfg = self.config
        started = time.monotonic()
        tables = self.pooled_conditions()
        self.timings["encode_seconds"] = self.encode_seconds
        methods = {"clean": self.methods_clean(), "product": self.methods_product()}
        runs = sum(len(methods[regime]) for regime in cfg.regimes)
        bar = progress_bar(
            total=cfg.folds * len(cfg.seeds) * runs,
            desc="cross-validation runs",
            unit="run",
            disable=not self.progress,
        )
        for fold in range(cfg.folds):
            self.fold = fold
            for regime, conditions in self.fold_conditions(tables, fold).items():
                for seed in cfg.seeds:
                    for method in methods[regime]:
                        bar.set_postfix(fold=fold, regime=regime, method=method, seed=seed)
                        self.run(method, seed, regime, conditions)
                        bar.update(1)
            self._models.clear()  # a fold's models are never needed again
        self.fold = None
        bar.close()
        self.timings["encode_seconds"] = self.encode_seconds
        self.timings["total_seconds"] = time.monotonic() - started + self.timings["load_seconds"]

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
