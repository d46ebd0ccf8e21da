"""The cross-validation report: every test condition (clean, the paper's C/D/C+D, the realistic damage kinds) with
accuracy and weighted F1, calibration (ECE after temperature scaling, NLL, confidence, reliability diagrams) and
DRF's quality AUROC, every method side by side, then the model's targets on the cross-validated means and where
DRF falls below a baseline or the intact modality's specialist.  Written as ``report.md``, ``results.json`` and
``reliability.png`` from plain results data (``EvaluationResults``), like the published-split report.

Every cell is the mean ± sample standard deviation over folds × seeds of the per-(fold, seed) results.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.evaluation.cv_tables import (
    comparison_table,
    conditions,
    margin_table,
    metric_table,
    shortfalls,
)
from core.evaluation.product_report import product_section, product_targets
from core.evaluation.report import EvaluationResults, _method_name, aggregate, targets


def confidence_summary(results: Sequence[dict[str, Any]], tests: Sequence[str]) -> str:
    """Whether DRF publishes lower confidence on damaged posts than on clean ones (mean top-label probability)."""
    clean = aggregate(results, "drf", "clean", "clean")
    if clean is None or "confidence" not in clean:
        return ""
    lower: list[str] = []
    not_lower: list[str] = []
    for test in tests[1:]:
        agg = aggregate(results, "drf", "clean", test)
        if agg is not None and "confidence" in agg:
            (lower if agg["confidence"] < clean["confidence"] else not_lower).append(
                f"{test} {agg['confidence']:.3f}"
            )
    text = (
        f"DRF's mean top-label probability (after temperature scaling) is {clean['confidence']:.3f} on clean "
        f"posts; it is lower on {len(lower)} of {len(lower) + len(not_lower)} damaged conditions"
    )
    text += f" ({', '.join(lower)})" if lower else ""
    text += f", and not lower on {', '.join(not_lower)}." if not_lower else "."
    return text


def _pooled_bins(
    results: Sequence[dict[str, Any]], method: str, test: str
) -> list[tuple[float, float, float]]:
    """(confidence, accuracy, count) per non-empty bin, pooled over folds × seeds."""
    rows = [
        r
        for r in results
        if (r["method"], r["regime"], r["test"]) == (method, "clean", test) and r.get("reliability")
    ]
    if not rows:
        return []
    pooled = []
    for k in range(len(rows[0]["reliability"])):
        count = sum(r["reliability"][k]["count"] for r in rows)
        if count:
            conf = sum(r["reliability"][k]["confidence"] * r["reliability"][k]["count"] for r in rows) / count
            acc = sum(r["reliability"][k]["accuracy"] * r["reliability"][k]["count"] for r in rows) / count
            pooled.append((conf, acc, count))
    return pooled


def plot_reliability(data: EvaluationResults, methods: Sequence[str], path: Path) -> bool:
    """Reliability diagrams of the conditions whose bins were kept, one panel each; False when there are none."""
    tests = [
        t
        for t in data.config["reliability_tests"]
        if any(r["test"] == t and r.get("reliability") for r in data.results)
    ]
    if not tests:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tests), figsize=(4.2 * len(tests), 4.0), squeeze=False)
    for ax, test in zip(axes[0], tests, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for method in methods:
            bins = _pooled_bins(data.results, method, test)
            if bins:
                ax.plot(
                    [b[0] for b in bins],
                    [b[1] for b in bins],
                    marker="o",
                    markersize=3,
                    label=_method_name(method),
                )
        ax.set_title(test)
        ax.set_xlabel("confidence (after temperature scaling)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0.3, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Reliability, 15 equal-width bins pooled over folds × seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_cv_report(data: EvaluationResults, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, report.md and reliability.png to ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    cfg = data.config
    tests = conditions(cfg)
    methods = [m for m in data.methods if not m.startswith("drf-no-")]
    baselines = [m for m in cfg["baselines"] if m in methods]
    checks = [
        {**c, "margin": round(c["drf"] - c["bound"], 3)}
        for c in targets(
            data.results, [r for r in data.quality_auroc if r.get("regime", "clean") == "clean"], ()
        )
    ]
    gaps = shortfalls(data.results, tests, baselines)
    document = {
        **data.describe,
        "targets": checks,
        "shortfalls": gaps,
        "product_targets": product_targets(data, tests, baselines),
        "quality_auroc": data.quality_auroc,
        "damage_auroc": data.damage_auroc,
        "results": data.results,
    }
    paths["json"].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    if plot_reliability(
        data, ["drf", *[b for b in ("concat", "gated_router") if b in baselines]], out / "reliability.png"
    ):
        paths["figure"] = out / "reliability.png"
    paths["markdown"].write_text(
        "\n".join(_sections(data, tests, methods, baselines, checks, gaps)), encoding="utf-8"
    )
    return paths


def _sections(
    data: EvaluationResults,
    tests: list[str],
    methods: list[str],
    baselines: list[str],
    checks: list[dict[str, Any]],
    gaps: list[dict[str, Any]],
) -> list[str]:
    describe, cfg = data.describe, data.config
    cv = describe["crossval"]
    timings = describe["timings"]
    sizes = cv["fold_sizes"]
    mean_size = {k: statistics.fmean(s[k] for s in sizes) for k in ("train", "dev", "test")} if sizes else {}
    runs = cfg["folds"] * len(cfg["seeds"])
    gate_rows = [r for r in data.results if r["method"] == "gated_router" and r["test"] == "clean"]
    caption = (
        f"*{describe['data']['name']}: all {cv['posts']} posts in {cfg['folds']} stratified folds (fold seed "
        f"{cfg['fold_seed']}); per fold train/dev/test about {mean_size.get('train', 0):.0f}/"
        f"{mean_size.get('dev', 0):.0f}/{mean_size.get('test', 0):.0f}; seeds "
        f"{', '.join(str(s) for s in cfg['seeds'])}; mean ± sample std over {runs} (fold, seed) runs. Trained "
        f"clean, model selected on dev. Encoders: {describe['encoders']}; head d={cfg['dim']}, "
        f"L={cfg['queue_size']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['head_lr']:g}. "
        f"Disruption and damage seed {cfg['disruption_seed']}.*"
    )
    lines = [
        f"# DRF cross-validated on {describe['data']['name']}",
        "",
        f"Produced by `postsense evaluate --folds {cfg['folds']}` on {describe['created_at']} in "
        f"{timings['total_seconds'] / 60:.1f} min ({timings['encode_seconds'] / 60:.1f} min of it encoding "
        "features the cache lacked); raw per-(fold, seed) numbers in `results.json` (each row has its `fold`).",
        "",
        caption,
        "",
        "Conditions: `clean`; the paper's modality-fixed disruption of every test post (`C` corrupt, `D` discard, "
        "`C+D` half each); the realistic damage kinds of `core/data/damage.py` (`image/truncated`: cut at 30–70 % "
        "of its bytes and decoded as the service decodes it; one that does not decode is a missing image, as the "
        "service treats it). The intact modality's specialist is text only for image conditions and image only "
        "for text conditions.",
        "",
        "## Accuracy (%)",
        "",
        *metric_table(data.results, methods, tests, "accuracy"),
        "",
        "## DRF against the best baseline and the intact specialist",
        "",
        "Accuracy in %; quality AUROC: DRF's published q of the damaged modality, the fold's clean posts against the "
        "same posts damaged (posts where that modality is present); ECE after temperature scaling.",
        "",
        *comparison_table(data, tests, baselines),
        "",
        "## Weighted F1 (%)",
        "",
        *metric_table(data.results, methods, tests, "weighted_f1"),
        "",
        "## Calibration",
        "",
        "Temperature scaling (one T per model, fitted on the fold's clean dev posts after model selection) is what "
        "the product publishes. ECE: top-label, 15 equal-width bins, in [0, 1].",
        "",
        "**ECE after temperature scaling**",
        "",
        *metric_table(data.results, methods, tests, "ece", 3),
        "",
        "**ECE without it** (`ece_raw`)",
        "",
        *metric_table(data.results, methods, tests, "ece_raw", 3),
        "",
        "**NLL after temperature scaling**",
        "",
        *metric_table(data.results, methods, tests, "nll", 3),
        "",
        "**Mean top-label probability (confidence) after temperature scaling**",
        "",
        *metric_table(data.results, methods, tests, "confidence", 3),
        "",
        confidence_summary(data.results, tests),
        "",
        "![Reliability diagrams](reliability.png)",
        "",
        "## Quality-gated router",
        "",
        "The router with DRF's published quality as a gate (core/evaluation/baselines.py): gates picked on each "
        "fold's dev posts, clean and with each modality corrupted (C). Mean gates (log q; −inf = never gate): image "
        + _mean_gate(gate_rows, "gate_image")
        + ", text "
        + _mean_gate(gate_rows, "gate_text")
        + ".",
        "",
        "## Targets (cross-validated means)",
        "",
        "The model's targets, unchanged, judged on the means over folds × seeds (Figure 5 targets: in the "
        "published-split report). margin = DRF − bound.",
        "",
        *margin_table(checks),
        "",
        _targets_count(checks),
        "",
        "### Where DRF falls below a baseline or the intact specialist",
        "",
        "Every condition and comparator with a higher mean accuracy than DRF (image/mismatched has no quality "
        "target; it is listed like the others).",
        "",
        "| Condition | comparator | DRF | comparator | DRF − comparator |",
        "|---|---|---|---|---|",
        *(
            f"| {g['test']} | {_method_name(g['method'])} | {g['drf']} | {g['other']} | {g['gap']:+g} |"
            for g in gaps
        ),
        "",
    ]
    if not gaps:
        lines.insert(-1, "None: DRF's mean is at or above every baseline and specialist in every condition.")
    return lines + product_section(data, tests, baselines)


def _targets_count(checks: Sequence[dict[str, Any]]) -> str:
    """How many targets are met, and how many of those the published-split report also judges (the ``≥
    gated_router`` rows came with the gated router)."""
    older = [c for c in checks if "gated_router" not in c["target"]]
    return (
        f"{sum(c['met'] for c in checks)} of {len(checks)} targets met; of the published-split report's targets "
        f"(without Figure 5) {sum(c['met'] for c in older)} of {len(older)}; the {len(checks) - len(older)} rows "
        "“≥ gated_router” are new with the gated router."
    )


def _mean_gate(rows: Sequence[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    finite = [v for v in values if v != float("-inf")]
    if not values:
        return "–"
    never = len(values) - len(finite)
    text = f"{statistics.fmean(finite):.2f}" if finite else "never"
    return text + (f" ({never} of {len(values)} runs never gate)" if never and finite else "")


def results_from_json(path: str | Path) -> EvaluationResults:
    """The plain results a cross-validation's ``results.json`` holds, to write its report again."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    derived = ("targets", "shortfalls", "product_targets", "quality_auroc", "damage_auroc", "results")
    describe = {k: v for k, v in doc.items() if k not in derived}
    methods = list(dict.fromkeys(r["method"] for r in doc["results"]))
    return EvaluationResults(describe, doc["results"], doc["quality_auroc"], methods, doc["damage_auroc"])
