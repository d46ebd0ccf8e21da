"""The paper's evaluation on any data set: Tables 1, 3, 4 and Figure 5, with baselines trained the same way.

* Table 3: trained and tested clean.
* Table 1: the clean-trained models tested under modality-fixed disruption (image or text; C, D, C+D).
* Table 4: the same for DRF with one component switched off (core.model.ABLATIONS).
* Figure 5: modality-random disruption with ratio dr in training, dev and test; dr = 0 is the clean run.

Every number is the mean and sample standard deviation over training seeds.  The disruption is drawn once
(``disruption_seed``) so that every method and seed is scored on exactly the same disrupted samples (a paired
comparison).  Model selection uses the dev split only.  Encoders are frozen and features cached
(core/train.py), so each run trains only a head.  Outputs: ``report.md``, ``results.json`` and ``figure5.png``.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.baselines import BASELINES, HEADS, BaselineHead, Router
from core.data import Dataset, load_dataset
from core.data.disruption import DISRUPTION_RATIOS, SETTINGS, disrupt_dataset
from core.drf import DEFAULT_VARIANT, MECHANISMS, VARIANTS
from core.encoders import Encoders
from core.model import ABLATIONS, DRFModel, create_model
from core.progress import progress as progress_bar
from core.train import (
    CPU_DIM,
    CPU_QUEUE_SIZE,
    CPU_TRAIN,
    CachedSource,
    FeatureCache,
    FeatureTable,
    Trainable,
    TrainConfig,
    classification_scores,
    encode_padding,
    encode_samples,
    feature_cache_for,
    fit,
    one_thread,
    predict,
)

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
ENCODER_DESCRIPTIONS = {
    "offline": "offline: EfficientNet-Lite0 (ImageNet, 1280-d) + all-MiniLM-L6-v2 (384-d), frozen, cached features",
    "paper": "paper: ViT-B/16 + BERT-base (768-d), frozen, cached features",
    "tiny": "tiny: random-init test encoders, frozen, cached features",
}
ABLATION_NAMES = {
    "sample_recovery": "w/o sample-based recovery",
    "distribution_recovery": "w/o distribution-based recovery",
    "gaussian_weights": "w/o Gaussian probability",
    "expansion": "w/o image-text expansion",
    "distribution_constraint": "w/o distribution constraint",
}
METHOD_NAMES = {
    "drf": "DRF",
    "drf-paper": "DRF, paper-literal",
    "concat": "Concat (padded)",
    "concat_dropout": "Concat + modality dropout",
    "router": "Router (specialist per post)",
    "text_only": "Text only",
    "image_only": "Image only",
}


@dataclass(frozen=True)
class EvalConfig:
    """What to run; the defaults are the CPU configuration of the full report (see docs/evaluation.md).

    It departs from the paper's section 4.2 to fit a shared 2-core CPU: core.train.CPU_DIM, CPU_QUEUE_SIZE and
    CPU_TRAIN.  Figure 5 has the D and C+D panels by default; C (corrupt only) needs ~6,000 more image encodings
    on this CPU (``random_settings=SETTINGS`` adds it).
    """

    data: str = "vader"
    encoders: str = "offline"
    encoder_options: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    dim: int = CPU_DIM
    queue_size: int = CPU_QUEUE_SIZE
    epochs: int = CPU_TRAIN.epochs
    batch_size: int = CPU_TRAIN.batch_size
    encoder_lr: float = CPU_TRAIN.encoder_lr
    head_lr: float = CPU_TRAIN.head_lr
    min_lr: float = CPU_TRAIN.min_lr
    disruption_seed: int = 0
    fixed_settings: tuple[str, ...] = SETTINGS
    random_settings: tuple[str, ...] = ("D", "C+D")
    ratios: tuple[float, ...] = DISRUPTION_RATIOS
    ablations: tuple[str, ...] = ABLATIONS
    baselines: tuple[str, ...] = BASELINES
    random_methods: tuple[str, ...] = ("drf", "concat")
    variant: str = DEFAULT_VARIANT  # the DRF variant of "drf" and its ablations (core.drf.VARIANTS)
    # Mechanisms of the variant to switch back to the paper's one at a time ("drf-paper-<mechanism>", clean regime).
    mechanisms: tuple[str, ...] = ()
    compare_paper: bool = True  # also run the paper-literal variant ("drf-paper") on the clean regime

    def __post_init__(self) -> None:
        problems = []
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and non-empty, got {self.seeds}")
        for name, values, known in (
            ("fixed_settings", self.fixed_settings, SETTINGS),
            ("random_settings", self.random_settings, SETTINGS),
            ("ablations", self.ablations, ABLATIONS),
            ("mechanisms", self.mechanisms, MECHANISMS),
            ("baselines", self.baselines, BASELINES),
            ("random_methods", self.random_methods, ("drf", "drf-paper", *BASELINES)),
        ):
            unknown = [v for v in values if v not in known]
            if unknown:
                problems.append(f"{name}: unknown {unknown}; known: {list(known)}")
        if self.variant not in VARIANTS:
            problems.append(f"variant: unknown {self.variant!r}; known: {list(VARIANTS)}")
        if "router" in (*self.baselines, *self.random_methods) and not {"concat", "text_only", "image_only"} <= set(
            self.baselines
        ):
            problems.append("the router baseline is composed of the concat, text_only and image_only baselines")
        if any(not 0 < r <= 1 for r in self.ratios):
            problems.append(f"ratios must lie in (0, 1], got {self.ratios}")
        if problems:
            raise ValueError("invalid evaluation configuration: " + "; ".join(problems))
        self.train_config(0)  # validates the optimisation settings

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, encoder_lr=self.encoder_lr, head_lr=self.head_lr,
            min_lr=self.min_lr, seed=seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        self.base = create_model(
            config.encoders, self.labels, dim=config.dim, queue_size=config.queue_size,
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

    def random_conditions(self, setting: str, dr: float) -> Conditions:
        """Every split disrupted with ratio ``dr`` (training, model selection and test alike)."""
        disrupted, stats = disrupt_dataset(self.dataset, "random", setting, self.config.disruption_seed, dr=dr)
        self.disruption_stats[f"random {setting} dr={dr:g}"] = {k: dict(v.disrupted) for k, v in stats.items()}
        return Conditions(
            self._encode(disrupted, "train"), self._encode(disrupted, "dev"), {"test": self._encode(disrupted, "test")}
        )

    # -- models

    def build(self, method: str, seed: int) -> Trainable:
        """A fresh head, initialised from ``seed``: "drf", "drf-paper", "drf-no-<ablation>" or a baseline head."""
        torch.manual_seed(seed)
        if method in HEADS:
            return BaselineHead(method, self.labels, *self.padding, dim=self.config.dim)
        options = dict(VARIANTS["paper" if method == "drf-paper" else self.config.variant])
        if method.startswith("drf-no-"):
            options[method.removeprefix("drf-no-")] = False
        elif method.startswith("drf-paper-"):
            mechanism = method.removeprefix("drf-paper-")
            options[mechanism] = VARIANTS["paper"][mechanism]
        elif method not in ("drf", "drf-paper"):
            raise ValueError(f"unknown method {method!r}")
        return DRFModel(self.encoders, self.labels, dim=self.config.dim, queue_size=self.config.queue_size, **options)

    def trained(self, method: str, seed: int, regime: str, conditions: Conditions) -> tuple[Trainable, dict[str, Any]]:
        """The model of ``method`` trained on ``conditions`` (baseline heads are kept: the router reuses them)."""
        key = (method, seed, regime)
        if key in self._models:
            return self._models[key]
        if method == "router":
            parts = [self.trained(m, seed, regime, conditions)[0] for m in ("concat", "text_only", "image_only")]
            return Router(*parts), {"best_epoch": 0, "best_dev_accuracy": float("nan"), "train_seconds": 0.0}
        model = self.build(method, seed)
        with one_thread():  # encoding keeps every thread; heads train faster on one
            result = fit(
                model, CachedSource(conditions.train), CachedSource(conditions.dev), self.config.train_config(seed)
            )
        info = {
            "best_epoch": result.best_epoch, "best_dev_accuracy": result.best_dev_accuracy,
            "train_seconds": result.seconds, "history": result.history,
        }
        if method in HEADS:
            self._models[key] = (model, info)
        return model, info

    def run(self, method: str, seed: int, regime: str, conditions: Conditions) -> None:
        model, info = self.trained(method, seed, regime, conditions)
        for test_name, table in conditions.tests.items():
            predicted = predict(model, CachedSource(table)).argmax(-1)
            scores = classification_scores(table.labels.numpy(), predicted, len(self.labels))
            self.results.append({"method": method, "seed": seed, "regime": regime, "test": test_name, **scores, **info})
        if isinstance(model, DRFModel) and {"clean", "image/C", "text/C"} <= set(conditions.tests):
            self.quality_auroc.append({"method": method, "seed": seed, **quality_auroc(model, conditions.tests)})

    def methods_clean(self) -> list[str]:
        paper = ["drf-paper"] if self.config.compare_paper and self.config.variant != "paper" else []
        return [
            "drf", *paper, *(f"drf-paper-{m}" for m in self.config.mechanisms),
            *(f"drf-no-{a}" for a in self.config.ablations), *self.config.baselines,
        ]

    def execute(self) -> None:
        cfg = self.config
        started = time.monotonic()
        clean = self.clean_conditions()
        total = len(cfg.seeds) * (len(self.methods_clean()) + len(cfg.random_settings) * len(cfg.ratios) * len(cfg.random_methods))
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

    def describe(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "data": {
                "spec": self.config.data, "name": ds.name, "sizes": ds.sizes(),
                "label_counts": {s: ds.label_counts(s) for s in ds.splits}, "attribution": ds.meta.get("attribution"),
            },
            "encoders": ENCODER_DESCRIPTIONS.get(self.config.encoders, self.config.encoders),
            "config": self.config.to_dict(),
            "disruption": self.disruption_stats,
            "timings": self.timings,
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


# ----------------------------------------------------------------------------------------- quality scores


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
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
        out = model.forward_features(table.image, table.text, table.image_present, table.text_present)
        return {
            "image": out.log_quality_image[table.image_present].float().numpy(),
            "text": out.log_quality_text[table.text_present].float().numpy(),
        }

    clean = log_q(tests["clean"])
    return {m: auroc(clean[m], log_q(tests[f"{m}/C"])[m]) for m in MODALITIES}


# ------------------------------------------------------------------------------------------------- tables


def aggregate(results: Sequence[dict[str, Any]], method: str, regime: str, test: str) -> dict[str, float] | None:
    """Mean and sample standard deviation over seeds of one (method, regime, test) cell; None if not run."""
    rows = [r for r in results if (r["method"], r["regime"], r["test"]) == (method, regime, test)]
    if not rows:
        return None
    out: dict[str, float] = {"n": float(len(rows))}
    for metric in ("accuracy", "weighted_f1"):
        values = [r[metric] for r in rows]
        out[metric] = statistics.fmean(values)
        out[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _cell(agg: dict[str, float] | None) -> str:
    if agg is None:
        return "–"
    return (f"{agg['accuracy']:.1f} ± {agg['accuracy_sd']:.1f} / {agg['weighted_f1']:.1f} ± "
            f"{agg['weighted_f1_sd']:.1f}")


def _method_name(method: str) -> str:
    if method.startswith("drf-no-"):
        return ABLATION_NAMES[method.removeprefix("drf-no-")]
    if method.startswith("drf-paper-"):
        mechanism = method.removeprefix("drf-paper-")
        return f"{mechanism} = {VARIANTS['paper'][mechanism]} (paper)"
    return METHOD_NAMES[method]


def _caption(describe: dict[str, Any], split_note: str) -> str:
    cfg, data = describe["config"], describe["data"]
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    return (
        f"*Data: {data['name']} ({split_note}; sizes train/dev/test {data['sizes'].get('train')}/"
        f"{data['sizes'].get('dev')}/{data['sizes'].get('test')}; model selected on dev). Seeds {seeds}: "
        f"ACC / weighted F1 in %, mean ± sample std. Disruption seed {cfg['disruption_seed']}. "
        f"Encoders: {describe['encoders']}; head d={cfg['dim']}, L={cfg['queue_size']}, {cfg['epochs']} epochs, "
        f"batch {cfg['batch_size']}, AdamW lr {cfg['head_lr']:g} (head), cosine to {cfg['min_lr']:g}.*"
    )


def fixed_table(results: Sequence[dict[str, Any]], methods: Sequence[str], settings: Sequence[str]) -> list[str]:
    lines = ["| Disrupted | Method | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    for modality in MODALITIES:
        for method in methods:
            cells = [_cell(aggregate(results, method, "clean", f"{modality}/{s}")) for s in settings]
            lines.append(f"| {modality} | {_method_name(method)} | " + " | ".join(cells) + " |")
    return lines


def clean_table(results: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    lines = ["| Method | ACC / F1 |", "|---|---|"]
    lines += [f"| {_method_name(m)} | {_cell(aggregate(results, m, 'clean', 'clean'))} |" for m in methods]
    return lines


def random_table(
    results: Sequence[dict[str, Any]], methods: Sequence[str], setting: str, ratios: Sequence[float]
) -> list[str]:
    """Accuracy against dr (dr = 0: the clean runs), and the drop from dr = 0.2 to 1.0 as the paper quotes it."""
    header = ["0 (clean)", *(f"{r:g}" for r in ratios), "drop 0.2→1.0"]
    lines = [f"| Method ({setting}) | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for method in methods:
        points = random_curve(results, method, setting, ratios)
        cells = [f"{a['accuracy']:.1f} ± {a['accuracy_sd']:.1f}" if a else "–" for _, a in points]
        by_ratio = dict(points)
        low, high = by_ratio.get(0.2), by_ratio.get(1.0)
        cells.append(f"{low['accuracy'] - high['accuracy']:.1f}" if low and high else "–")
        lines.append(f"| {_method_name(method)} | " + " | ".join(cells) + " |")
    return lines


def random_curve(
    results: Sequence[dict[str, Any]], method: str, setting: str, ratios: Sequence[float]
) -> list[tuple[float, dict[str, float] | None]]:
    points = [(0.0, aggregate(results, method, "clean", "clean"))]
    points += [(r, aggregate(results, method, f"random {setting} dr={r:g}", "test")) for r in ratios]
    return points


def mechanism_section(
    results: Sequence[dict[str, Any]], auroc_rows: Sequence[dict[str, Any]], config: EvalConfig
) -> list[str]:
    """DRF with one mechanism of its variant switched back to the paper's: accuracy per test, quality AUROC."""
    if not config.mechanisms:
        return []
    tests = ["clean", *(f"{m}/{s}" for m in MODALITIES for s in config.fixed_settings)]
    header = "| Method | " + " | ".join(tests) + " | AUROC image | AUROC text |"
    lines = [f"## Mechanisms of the {config.variant} variant, one at a time back to the paper's", "",
             "Trained clean; accuracy in %, mean ± sample std over seeds.", "", header,
             "|---|" + "---|" * (len(tests) + 2)]
    for method in ["drf", *(f"drf-paper-{m}" for m in config.mechanisms)]:
        cells = []
        for test in tests:
            agg = aggregate(results, method, "clean", test)
            cells.append("–" if agg is None else f"{agg['accuracy']:.1f} ± {agg['accuracy_sd']:.1f}")
        for modality in MODALITIES:
            values = [row[modality] for row in auroc_rows if row["method"] == method]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "–")
        lines.append(f"| {_method_name(method)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def auroc_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Quality AUROC (intact vs corrupted) per DRF method, mean ± sd over seeds."""
    lines = ["| Method | image q AUROC | text q AUROC |", "|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        chosen = [r for r in rows if r["method"] == method]
        cells = [_mean_sd([r[m] for r in chosen]) for m in MODALITIES]
        lines.append(f"| {_method_name(method)} | " + " | ".join(cells) + " |")
    return lines


#: Columns of the diagnostics table: (history key, heading).
DIAGNOSTICS = (
    ("acceptance_image", "accepted (image)"),
    ("acceptance_text", "accepted (text)"),
    ("queue_fill_image", "queue fill (image)"),
    ("sigma_image", "σ image"),
    ("sigma_text", "σ text"),
    ("log_q_image_p50", "median log q image"),
    ("log_q_recovered_image_p50", "median log q recovered image"),
    ("log_q_text_p50", "median log q text"),
    ("log_q_recovered_text_p50", "median log q recovered text"),
    ("share_intact", "share intact"),
    ("share_image+recovered_text", "share image+rec. text"),
    ("share_recovered_image+text", "share rec. image+text"),
    ("fused_norm", "‖M‖"),
)


def diagnostics_table(results: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """The training diagnostics (core.drf.output_diagnostics on dev) at the first and the last epoch of each
    DRF variant trained clean, mean over seeds: how the queues and the fusion weights evolve."""
    lines = ["| Method | epoch | " + " | ".join(h for _, h in DIAGNOSTICS) + " |", "|---|---|" + "---|" * len(DIAGNOSTICS)]
    for method in methods:
        runs = {r["seed"]: r["history"] for r in results
                if r["method"] == method and r["regime"] == "clean" and r.get("history")}
        if not runs:
            continue
        for label, pick in (("first", 0), ("last", -1)):
            records = [h[pick] for h in runs.values()]
            cells = []
            for key, _ in DIAGNOSTICS:
                values = [r[key] for r in records if key in r]
                cells.append(f"{statistics.fmean(values):.3g}" if values else "–")
            lines.append(f"| {_method_name(method)} | {label} ({records[0]['epoch']}) | " + " | ".join(cells) + " |")
    return lines


def targets(results: Sequence[dict[str, Any]], auroc_rows: Sequence[dict[str, Any]], ratios: Sequence[float]) -> list[dict[str, Any]]:
    """The acceptance targets of the model (issue 12), each with the numbers it was judged on (accuracy means)."""

    def acc(method: str, test: str, regime: str = "clean") -> float | None:
        agg = aggregate(results, method, regime, test)
        return None if agg is None else agg["accuracy"]

    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, bound: float | None, margin: float = 0.0, at_most: bool = False) -> None:
        """``value >= bound + margin`` (``at_most``: ``value <= bound``); skipped when a number is missing."""
        if value is None or bound is None:
            return
        limit = bound + margin
        checks.append({"target": name, "drf": round(value, 2), "bound": round(limit, 2),
                       "met": value <= limit if at_most else value >= limit})

    baselines = [m for m in ("concat", "concat_dropout", "router") if acc(m, "clean") is not None]
    best = max((acc(m, "clean") for m in baselines), default=None)
    check("clean ≥ best baseline − 0.5", acc("drf", "clean"), best, -0.5)
    check("clean ≥ 70 %", acc("drf", "clean"), 70.0)
    for modality, specialist in (("image", "text_only"), ("text", "image_only")):
        test = f"{modality}/D"
        check(f"{modality} D ≥ router − 0.5", acc("drf", test), acc("router", test), -0.5)
        check(f"{modality} D ≥ concat + 5", acc("drf", test), acc("concat", test), 5.0)
        for setting in ("C", "C+D"):
            test = f"{modality}/{setting}"
            for baseline in ("concat", "concat_dropout", "router"):
                check(f"{modality} {setting} ≥ {baseline}", acc("drf", test), acc(baseline, test))
            check(f"{modality} {setting} ≥ {specialist} − 1", acc("drf", test), acc(specialist, test), -1.0)
    curve = {r: acc("drf", "test", f"random C+D dr={r:g}") for r in ratios}
    if curve.get(0.2) is not None and curve.get(1.0) is not None:
        check("Figure 5 C+D: drop 0.2→1.0 ≤ 5", curve[0.2] - curve[1.0], 5.0, at_most=True)
    for r in ratios:
        check(f"Figure 5 C+D dr={r:g}: ≥ concat", curve.get(r), acc("concat", "test", f"random C+D dr={r:g}"))
    for modality in MODALITIES:
        values = [row[modality] for row in auroc_rows if row["method"] == "drf"]
        if values:
            checks.append({"target": f"quality AUROC {modality} ≥ 0.9", "drf": round(statistics.fmean(values), 3),
                           "bound": 0.9, "met": statistics.fmean(values) >= 0.9})
    return checks


def targets_table(checks: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| Target | DRF | bound | met |", "|---|---|---|---|"]
    lines += [f"| {c['target']} | {c['drf']} | {c['bound']} | {'yes' if c['met'] else '**no**'} |" for c in checks]
    return lines


def plot_random(results: Sequence[dict[str, Any]], config: EvalConfig, describe: dict[str, Any], path: Path) -> None:
    """Figure 5: accuracy against dr, one panel per setting, error bars = sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = config.random_settings
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for method in config.random_methods:
            points = [(r, a) for r, a in random_curve(results, method, setting, config.ratios) if a is not None]
            ax.errorbar(
                [r for r, _ in points], [a["accuracy"] for _, a in points], yerr=[a["accuracy_sd"] for _, a in points],
                marker="o", capsize=3, label=_method_name(method),
            )
        ax.set_title(f"modality-random, {setting}")
        ax.set_xlabel("disruption ratio dr")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    seeds = ",".join(str(s) for s in config.seeds)
    fig.suptitle(f"{describe['data']['name']} test split, seeds {seeds}, encoders {config.encoders}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, results.json and figure5.png to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = evaluation.config
    describe = evaluation.describe()
    results = evaluation.results
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    checks = targets(results, evaluation.quality_auroc, cfg.ratios)
    paths["json"].write_text(
        json.dumps({**describe, "targets": checks, "quality_auroc": evaluation.quality_auroc, "results": results},
                   indent=1) + "\n",
        encoding="utf-8",
    )
    drf_methods = [m for m in evaluation.methods_clean() if m.startswith("drf")]
    drf_and_baselines = [m for m in ("drf", "drf-paper") if m in drf_methods] + list(cfg.baselines)
    lines = [
        f"# DRF evaluation on {describe['data']['name']}",
        "",
        f"Produced by `postsense evaluate` on {describe['created_at']} in {describe['timings']['total_seconds'] / 60:.1f} "
        f"min ({describe['timings']['encode_seconds'] / 60:.1f} min of it encoding uncached features); "
        f"raw per-seed numbers in `results.json`.",
        "",
        "## Table 3: without disruption",
        "",
        _caption(describe, "test split, clean"),
        "",
        *clean_table(results, evaluation.methods_clean()),
        "",
        "## Table 1: modality-fixed disruption (trained clean, every test sample disrupted)",
        "",
        _caption(describe, "test split, one modality disrupted in every sample"),
        "",
        *fixed_table(results, drf_and_baselines, cfg.fixed_settings),
        "",
        "## Table 4: ablations under modality-fixed disruption",
        "",
        _caption(describe, "test split, one modality disrupted in every sample"),
        "",
        *fixed_table(results, ["drf", *(f"drf-no-{a}" for a in cfg.ablations)], cfg.fixed_settings),
        "",
        *mechanism_section(results, evaluation.quality_auroc, cfg),
        "## Quality scores: intact against corrupted inputs",
        "",
        "AUROC of the published quality q on the clean test posts (intact) against the same posts with that "
        "modality corrupted (C), models trained clean; mean ± sample std over seeds.",
        "",
        *auroc_table(evaluation.quality_auroc),
        "",
        "## Training diagnostics",
        "",
        "On the dev split after the first and the last epoch (clean training), mean over seeds: share of offered "
        "features each queue admitted during the epoch, queue fill and σ, median log q of present and recovered "
        "features, mean share of each term of (12) for posts with both modalities, mean ‖M‖.",
        "",
        *diagnostics_table(results, [m for m in drf_methods if not m.startswith("drf-no-")]),
        "",
    ]
    if cfg.random_settings and cfg.ratios:
        paths["figure"] = out / "figure5.png"
        plot_random(results, cfg, describe, paths["figure"])
        lines += [
            "## Figure 5: modality-random disruption (ratio dr in train, dev and test)",
            "",
            _caption(describe, "test split disrupted with ratio dr like training; dr = 0 is Table 3"),
            "",
            "![Figure 5](figure5.png)",
            "",
        ]
        for setting in cfg.random_settings:
            lines += [*random_table(results, cfg.random_methods, setting, cfg.ratios), ""]
    lines += ["## Targets", "", "Accuracy means over seeds (AUROC for quality).", "", *targets_table(checks), ""]
    paths["markdown"].write_text("\n".join(lines), encoding="utf-8")
    return paths


def run_evaluation(config: EvalConfig, out_dir: str | Path, cache_root: str | Path, progress: bool = True) -> dict[str, Path]:
    """Run every configured experiment and write the report."""
    evaluation = Evaluation(config, cache_root, progress=progress)
    evaluation.execute()
    return write_report(evaluation, out_dir)
