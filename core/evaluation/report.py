"""The evaluation's report: the paper's tables (1, 3, 4), Figure 5, quality AUROC, training diagnostics and the
model's targets, written as ``report.md``, ``results.json`` and ``figure5.png`` from an evaluation's results, which
it reads as plain data (``EvaluationResults``): the report never sees the runs that made them.

Every cell is the mean and sample standard deviation over training seeds of the per-seed results.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.contracts import MODALITIES
from core.drf.head import VARIANTS

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
    "drf-e2e": "DRF, fine-tuned end to end",
    "concat": "Concat (padded)",
    "concat_dropout": "Concat + modality dropout",
    "router": "Router (specialist per post)",
    "gated_router": "Quality-gated router",
    "text_only": "Text only",
    "image_only": "Image only",
}
#: Calibration scores of a result row (core/evaluation/scoring.py), averaged by ``aggregate`` when every row has them.
CALIBRATION = ("ece", "ece_raw", "nll", "nll_raw", "confidence", "confidence_raw")


def aggregate(
    results: Sequence[dict[str, Any]], method: str, regime: str, test: str
) -> dict[str, float] | None:
    """Mean and sample standard deviation over seeds (and folds) of one (method, regime, test) cell; None if not
    run."""
    rows = [r for r in results if (r["method"], r["regime"], r["test"]) == (method, regime, test)]
    if not rows:
        return None
    out: dict[str, float] = {"n": float(len(rows))}
    for metric in ("accuracy", "weighted_f1", *(m for m in CALIBRATION if all(m in r for r in rows))):
        values = [r[metric] for r in rows]
        out[metric] = statistics.fmean(values)
        out[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _cell(agg: dict[str, float] | None) -> str:
    if agg is None:
        return "–"
    return (
        f"{agg['accuracy']:.1f} ± {agg['accuracy_sd']:.1f} / {agg['weighted_f1']:.1f} ± "
        f"{agg['weighted_f1_sd']:.1f}"
    )


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


def fixed_table(
    results: Sequence[dict[str, Any]], methods: Sequence[str], settings: Sequence[str]
) -> list[str]:
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
    results: Sequence[dict[str, Any]], auroc_rows: Sequence[dict[str, Any]], config: dict[str, Any]
) -> list[str]:
    """DRF with one mechanism of its variant switched back to the paper's: accuracy per test, quality AUROC."""
    if not config["mechanisms"]:
        return []
    tests = ["clean", *(f"{m}/{s}" for m in MODALITIES for s in config["fixed_settings"])]
    header = "| Method | " + " | ".join(tests) + " | AUROC image | AUROC text |"
    lines = [
        f"## Mechanisms of the {config['variant']} variant, one at a time back to the paper's",
        "",
        "Trained clean; accuracy in %, mean ± sample std over seeds.",
        "",
        header,
        "|---|" + "---|" * (len(tests) + 2),
    ]
    for method in ["drf", *(f"drf-paper-{m}" for m in config["mechanisms"])]:
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
    ("share_image_alone", "share image alone"),
    ("share_text_alone", "share text alone"),
    ("fused_norm", "‖M‖"),
)


def diagnostics_table(results: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """The training diagnostics (core.drf.diagnostics.output_diagnostics on dev) at the first and the last epoch of each
    DRF variant trained clean, mean over seeds: how the queues and the fusion weights evolve."""
    lines = [
        "| Method | epoch | " + " | ".join(h for _, h in DIAGNOSTICS) + " |",
        "|---|---|" + "---|" * len(DIAGNOSTICS),
    ]
    for method in methods:
        runs = {
            r["seed"]: r["history"]
            for r in results
            if r["method"] == method and r["regime"] == "clean" and r.get("history")
        }
        if not runs:
            continue
        for label, pick in (("first", 0), ("last", -1)):
            records = [h[pick] for h in runs.values()]
            cells = []
            for key, _ in DIAGNOSTICS:
                values = [r[key] for r in records if key in r]
                cells.append(f"{statistics.fmean(values):.3g}" if values else "–")
            lines.append(
                f"| {_method_name(method)} | {label} ({records[0]['epoch']}) | " + " | ".join(cells) + " |"
            )
    return lines


def targets(
    results: Sequence[dict[str, Any]], auroc_rows: Sequence[dict[str, Any]], ratios: Sequence[float]
) -> list[dict[str, Any]]:
    """The acceptance targets of the model, each with the numbers it was judged on (accuracy means)."""

    def acc(method: str, test: str, regime: str = "clean") -> float | None:
        agg = aggregate(results, method, regime, test)
        return None if agg is None else agg["accuracy"]

    checks: list[dict[str, Any]] = []

    def check(
        name: str, value: float | None, bound: float | None, margin: float = 0.0, at_most: bool = False
    ) -> None:
        """``value >= bound + margin`` (``at_most``: ``value <= bound``); skipped when a number is missing."""
        if value is None or bound is None:
            return
        limit = bound + margin
        checks.append(
            {
                "target": name,
                "drf": round(value, 2),
                "bound": round(limit, 2),
                "met": value <= limit if at_most else value >= limit,
            }
        )

    clean_baselines = [
        a
        for m in ("concat", "concat_dropout", "router", "gated_router")
        if (a := acc(m, "clean")) is not None
    ]
    best = max(clean_baselines, default=None)
    check("clean ≥ best baseline − 0.5", acc("drf", "clean"), best, -0.5)
    check("clean ≥ 70 %", acc("drf", "clean"), 70.0)
    for modality, specialist in (("image", "text_only"), ("text", "image_only")):
        test = f"{modality}/D"
        check(f"{modality} D ≥ router − 0.5", acc("drf", test), acc("router", test), -0.5)
        check(f"{modality} D ≥ concat + 5", acc("drf", test), acc("concat", test), 5.0)
        for setting in ("C", "C+D"):
            test = f"{modality}/{setting}"
            for baseline in ("concat", "concat_dropout", "router", "gated_router"):
                check(f"{modality} {setting} ≥ {baseline}", acc("drf", test), acc(baseline, test))
            check(f"{modality} {setting} ≥ {specialist} − 1", acc("drf", test), acc(specialist, test), -1.0)
    curve = {r: acc("drf", "test", f"random C+D dr={r:g}") for r in ratios}
    low, high = curve.get(0.2), curve.get(1.0)
    if low is not None and high is not None:
        check("Figure 5 C+D: drop 0.2→1.0 ≤ 5", low - high, 5.0, at_most=True)
    for r in ratios:
        check(f"Figure 5 C+D dr={r:g}: ≥ concat", curve.get(r), acc("concat", "test", f"random C+D dr={r:g}"))
    for modality in MODALITIES:
        values = [row[modality] for row in auroc_rows if row["method"] == "drf"]
        if values:
            checks.append(
                {
                    "target": f"quality AUROC {modality} ≥ 0.9",
                    "drf": round(statistics.fmean(values), 3),
                    "bound": 0.9,
                    "met": statistics.fmean(values) >= 0.9,
                }
            )
    return checks


def targets_table(checks: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| Target | DRF | bound | met |", "|---|---|---|---|"]
    lines += [
        f"| {c['target']} | {c['drf']} | {c['bound']} | {'yes' if c['met'] else '**no**'} |" for c in checks
    ]
    return lines


def plot_random(results: Sequence[dict[str, Any]], describe: dict[str, Any], path: Path) -> None:
    """Figure 5: accuracy against dr, one panel per setting, error bars = sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = describe["config"]
    settings = config["random_settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for method in config["random_methods"]:
            points = [
                (r, a) for r, a in random_curve(results, method, setting, config["ratios"]) if a is not None
            ]
            ax.errorbar(
                [r for r, _ in points],
                [a["accuracy"] for _, a in points],
                yerr=[a["accuracy_sd"] for _, a in points],
                marker="o",
                capsize=3,
                label=_method_name(method),
            )
        ax.set_title(f"modality-random, {setting}")
        ax.set_xlabel("disruption ratio dr")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    seeds = ",".join(str(s) for s in config["seeds"])
    fig.suptitle(
        f"{describe['data']['name']} test split, seeds {seeds}, encoders {config['encoders']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class EvaluationResults:
    """What an evaluation produced, as plain data: its description (data, encoders, ``config`` as a dict, timings,
    machine), the per-seed result rows, the quality-AUROC rows, and the methods run in the clean regime."""

    describe: dict[str, Any]
    results: list[dict[str, Any]]
    quality_auroc: list[dict[str, Any]]
    methods: list[str]
    damage_auroc: list[dict[str, Any]] = field(default_factory=list)  # DRF's quality AUROC per damaged test

    @property
    def config(self) -> dict[str, Any]:
        return self.describe["config"]


def write_report(data: EvaluationResults, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, report.md and (with modality-random runs) figure5.png to ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    checks = targets(data.results, data.quality_auroc, data.config["ratios"])
    document = {
        **data.describe,
        "targets": checks,
        "quality_auroc": data.quality_auroc,
        "damage_auroc": data.damage_auroc,
        "results": data.results,
    }
    paths["json"].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    lines = [*_tables(data), *_diagnostics_section(data)]
    if data.config["random_settings"] and data.config["ratios"]:
        paths["figure"] = out / "figure5.png"
        plot_random(data.results, data.describe, paths["figure"])
        lines += _figure_section(data)
    lines += [
        "## Targets",
        "",
        "Accuracy means over seeds (AUROC for quality).",
        "",
        *targets_table(checks),
        "",
    ]
    paths["markdown"].write_text("\n".join(lines), encoding="utf-8")
    return paths


def _tables(data: EvaluationResults) -> list[str]:
    """The title and Tables 3, 1 and 4, then the mechanisms section."""
    describe, cfg, results = data.describe, data.config, data.results
    drf_methods = [m for m in data.methods if m.startswith("drf")]
    drf_and_baselines = [m for m in ("drf", "drf-paper") if m in drf_methods] + list(cfg["baselines"])
    timings = describe["timings"]
    disrupted = _caption(describe, "test split, one modality disrupted in every sample")
    return [
        f"# DRF evaluation on {describe['data']['name']}",
        "",
        f"Produced by `postsense evaluate` on {describe['created_at']} in {timings['total_seconds'] / 60:.1f} "
        f"min ({timings['encode_seconds'] / 60:.1f} min of it encoding uncached features); "
        f"raw per-seed numbers in `results.json`.",
        "",
        "## Table 3: without disruption",
        "",
        _caption(describe, "test split, clean"),
        "",
        *clean_table(results, data.methods),
        "",
        "## Table 1: modality-fixed disruption (trained clean, every test sample disrupted)",
        "",
        disrupted,
        "",
        *fixed_table(results, drf_and_baselines, cfg["fixed_settings"]),
        "",
        "## Table 4: ablations under modality-fixed disruption",
        "",
        disrupted,
        "",
        *fixed_table(results, ["drf", *(f"drf-no-{a}" for a in cfg["ablations"])], cfg["fixed_settings"]),
        "",
        *mechanism_section(results, data.quality_auroc, cfg),
    ]


def _diagnostics_section(data: EvaluationResults) -> list[str]:
    """Quality AUROC, then the training diagnostics of DRF and its paper-mechanism variants."""
    drf_methods = [m for m in data.methods if m.startswith("drf") and not m.startswith("drf-no-")]
    return [
        "## Quality scores: intact against corrupted inputs",
        "",
        "AUROC of the published quality q on the clean test posts (intact) against the same posts with that "
        "modality corrupted (C), models trained clean; mean ± sample std over seeds.",
        "",
        *auroc_table(data.quality_auroc),
        "",
        "## Training diagnostics",
        "",
        "On the dev split after the first and the last epoch (clean training), mean over seeds: share of offered "
        "features each queue admitted during the epoch, queue fill and σ, median log q of present and recovered "
        "features, mean share of each term of (12) and of each specialist term for posts with both modalities, mean ‖M‖.",
        "",
        *diagnostics_table(data.results, drf_methods),
        "",
    ]


def _figure_section(data: EvaluationResults) -> list[str]:
    cfg = data.config
    lines = [
        "## Figure 5: modality-random disruption (ratio dr in train, dev and test)",
        "",
        _caption(data.describe, "test split disrupted with ratio dr like training; dr = 0 is Table 3"),
        "",
        "![Figure 5](figure5.png)",
        "",
    ]
    for setting in cfg["random_settings"]:
        lines += [*random_table(data.results, cfg["random_methods"], setting, cfg["ratios"]), ""]
    return lines
