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

import torch
from tqdm import tqdm

from core.baselines import BASELINES, BaselineHead
from core.data import Dataset, load_dataset
from core.data.disruption import DISRUPTION_RATIOS, SETTINGS, disrupt_dataset
from core.encoders import Encoders
from core.model import ABLATIONS, DRFModel, create_model
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
METHOD_NAMES = {"drf": "DRF", "concat": "Concat (padded)", "text_only": "Text only", "image_only": "Image only"}


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

    def __post_init__(self) -> None:
        problems = []
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and non-empty, got {self.seeds}")
        for name, values, known in (
            ("fixed_settings", self.fixed_settings, SETTINGS),
            ("random_settings", self.random_settings, SETTINGS),
            ("ablations", self.ablations, ABLATIONS),
            ("baselines", self.baselines, BASELINES),
            ("random_methods", self.random_methods, ("drf", *BASELINES)),
        ):
            unknown = [v for v in values if v not in known]
            if unknown:
                problems.append(f"{name}: unknown {unknown}; known: {list(known)}")
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
        self.disruption_stats: dict[str, Any] = {}

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
        """A fresh head, initialised from ``seed``: "drf", "drf-no-<ablation>" or a baseline name."""
        torch.manual_seed(seed)
        if method in BASELINES:
            return BaselineHead(method, self.labels, *self.padding, dim=self.config.dim)
        switches = {}
        if method.startswith("drf-no-"):
            switches[method.removeprefix("drf-no-")] = False
        elif method != "drf":
            raise ValueError(f"unknown method {method!r}")
        return DRFModel(
            self.encoders, self.labels, dim=self.config.dim, queue_size=self.config.queue_size, **switches
        )

    def run(self, method: str, seed: int, regime: str, conditions: Conditions) -> None:
        model = self.build(method, seed)
        with one_thread():  # encoding keeps every thread; heads train faster on one
            trained = fit(
                model, CachedSource(conditions.train), CachedSource(conditions.dev), self.config.train_config(seed)
            )
        for test_name, table in conditions.tests.items():
            predicted = predict(model, CachedSource(table)).argmax(-1)
            scores = classification_scores(table.labels.numpy(), predicted, len(self.labels))
            self.results.append(
                {
                    "method": method, "seed": seed, "regime": regime, "test": test_name, **scores,
                    "best_epoch": trained.best_epoch, "best_dev_accuracy": trained.best_dev_accuracy,
                    "train_seconds": trained.seconds,
                }
            )

    def methods_clean(self) -> list[str]:
        return ["drf", *(f"drf-no-{a}" for a in self.config.ablations), *self.config.baselines]

    def execute(self) -> None:
        cfg = self.config
        started = time.monotonic()
        clean = self.clean_conditions()
        total = len(cfg.seeds) * (len(self.methods_clean()) + len(cfg.random_settings) * len(cfg.ratios) * len(cfg.random_methods))
        bar = tqdm(total=total, desc="evaluation runs", unit="run", disable=not self.progress)
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
    paths["json"].write_text(json.dumps({**describe, "results": results}, indent=1) + "\n", encoding="utf-8")
    drf_and_baselines = ["drf", *cfg.baselines]
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
    paths["markdown"].write_text("\n".join(lines), encoding="utf-8")
    return paths


def run_evaluation(config: EvalConfig, out_dir: str | Path, cache_root: str | Path, progress: bool = True) -> dict[str, Path]:
    """Run every configured experiment and write the report."""
    evaluation = Evaluation(config, cache_root, progress=progress)
    evaluation.execute()
    return write_report(evaluation, out_dir)
