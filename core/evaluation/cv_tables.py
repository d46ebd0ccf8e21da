"""Tables of the cross-validation report, shared by its clean-regime sections (cv_report.py) and its product
section (product_report.py): per-condition metric tables, DRF against the best baseline and the intact specialist,
and the shortfalls; each for one training regime.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from core.evaluation.report import EvaluationResults, _method_name, aggregate

#: Damage kinds no quality score can see (the modality is intact but wrong): reported, no quality target.
NO_QUALITY_TARGET = ("image/mismatched",)
SPECIALIST = {"image": "text_only", "text": "image_only"}


def conditions(config: dict[str, Any]) -> list[str]:
    paper = [f"{m}/{s}" for m in ("image", "text") for s in config["fixed_settings"]]
    damage = list(config["damage"])
    ordered = [c for m in ("image", "text") for c in (*paper, *damage) if c.startswith(f"{m}/")]
    return ["clean", *dict.fromkeys(ordered)]


def _cell(agg: dict[str, float] | None, metric: str, digits: int = 1) -> str:
    if agg is None or metric not in agg:
        return "–"
    return f"{agg[metric]:.{digits}f} ± {agg[f'{metric}_sd']:.{digits}f}"


def _auroc(rows: Sequence[dict[str, Any]], test: str, regime: str = "clean") -> list[float]:
    return [
        r["auroc"]
        for r in rows
        if r["method"] == "drf"
        and r.get("regime", "clean") == regime
        and r["test"] == test
        and r["auroc"] is not None
    ]


def _auroc_cell(rows: Sequence[dict[str, Any]], test: str, regime: str = "clean") -> str:
    if test == "clean":
        return "–"
    values = _auroc(rows, test, regime)
    if not values:
        return "n/a (modality missing)" if any(r["test"] == test for r in rows) else "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def metric_table(
    results: Sequence[dict[str, Any]],
    methods: Sequence[str],
    tests: Sequence[str],
    metric: str,
    digits: int = 1,
    regime: str = "clean",
) -> list[str]:
    """One row per condition, one column per method: ``metric`` mean ± sd over folds × seeds."""
    lines = [
        "| Condition | " + " | ".join(_method_name(m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for test in tests:
        cells = [_cell(aggregate(results, m, regime, test), metric, digits) for m in methods]
        lines.append(f"| {test} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(
    data: EvaluationResults, tests: Sequence[str], baselines: Sequence[str], regime: str = "clean"
) -> list[str]:
    """Per condition: DRF, the best baseline, the intact modality's specialist, the gaps, quality AUROC and ECE."""
    results = data.results
    lines = [
        "| Condition | DRF | best baseline | intact specialist | DRF − best | DRF − specialist | quality AUROC "
        "| ECE DRF | ECE best baseline | what the damage did |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    stats = data.describe.get("disruption", {})
    for test in tests:
        drf = aggregate(results, "drf", regime, test)
        if drf is None:
            continue
        scored = [(m, a) for m in baselines if (a := aggregate(results, m, regime, test)) is not None]
        best_name, best = max(scored, key=lambda ma: ma[1]["accuracy"], default=(None, None))
        modality = test.partition("/")[0]
        specialist = (
            aggregate(results, SPECIALIST[modality], regime, test) if modality in SPECIALIST else None
        )
        damage = stats.get(f"damage {test}")
        what = (
            f"{damage['damaged']} damaged, {damage['became_missing']} became missing"
            + (f", {damage['unchanged']} unchanged" if damage.get("unchanged") else "")
            if isinstance(damage, dict) and "damaged" in damage
            else ""
        )
        best_cell = f"{_method_name(best_name)} {best['accuracy']:.1f}" if best and best_name else "–"
        specialist_cell = (
            f"{_method_name(SPECIALIST[modality])} {specialist['accuracy']:.1f}" if specialist else "–"
        )
        cells = [
            test,
            _cell(drf, "accuracy"),
            best_cell,
            specialist_cell,
            f"{drf['accuracy'] - best['accuracy']:+.1f}" if best else "–",
            f"{drf['accuracy'] - specialist['accuracy']:+.1f}" if specialist else "–",
            _auroc_cell(data.damage_auroc, test, regime),
            _cell(drf, "ece", 3),
            _cell(best, "ece", 3),
            what,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def shortfalls(
    results: Sequence[dict[str, Any]], tests: Sequence[str], baselines: Sequence[str], regime: str = "clean"
) -> list[dict[str, Any]]:
    """Every (condition, comparator) where DRF's mean accuracy is below a baseline's or the intact specialist's."""
    found = []
    for test in tests:
        drf = aggregate(results, "drf", regime, test)
        if drf is None:
            continue
        for method in dict.fromkeys([*baselines, *SPECIALIST.values()]):
            other = aggregate(results, method, regime, test)
            if other is not None and other["accuracy"] > drf["accuracy"]:
                found.append(
                    {
                        "test": test,
                        "method": method,
                        "drf": round(drf["accuracy"], 2),
                        "other": round(other["accuracy"], 2),
                        "gap": round(drf["accuracy"] - other["accuracy"], 2),
                    }
                )
    return found


def margin_table(checks: Sequence[dict[str, Any]]) -> list[str]:
    """Targets with their margin (DRF − bound, or bound − DRF for an upper bound) and whether each is met."""
    return [
        "| Target | DRF | bound | margin | met |",
        "|---|---|---|---|---|",
        *(
            f"| {c['target']} | {c['drf']} | {c['bound']} | {c['margin']:+g} | {'yes' if c['met'] else '**no**'} |"
            for c in checks
        ),
    ]
