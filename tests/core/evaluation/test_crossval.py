"""Cross-validation end to end on a tiny data set, and the quality-gated router."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from training_data import make_dataset

from core.data.records import Sample
from core.evaluation import CrossValidation, EvalConfig
from core.evaluation.baselines import BaselineHead, GatedRouter, Router, choose_gates
from core.evaluation.cv_report import results_from_json, write_cv_report
from core.model import FeatureTable
from stream.cli import main

DAMAGE = ("image/truncated", "image/mismatched", "text/typos")


@pytest.fixture(scope="module")
def crossval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("synthetic"))
    out = tmp_path_factory.mktemp("cv")
    with pytest.raises(SystemExit) as done:
        main(
            [
                "evaluate",
                "--data",
                f"jsonl:{root}",
                "--out",
                str(out),
                "--folds",
                "2",
                "--seeds",
                "0",
                "--damage",
                *DAMAGE,
                "--encoders",
                "tiny",
                "--dim",
                "32",
                "--queue-size",
                "32",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--cache-dir",
                str(tmp_path_factory.mktemp("cache")),
                "--no-progress",
            ]
        )
    assert done.value.code == 0
    return out


def test_folds_run_end_to_end_and_every_row_carries_its_fold_and_calibration(crossval: Path) -> None:
    assert {p.name for p in crossval.iterdir()} == {"report.md", "results.json", "reliability.png"}
    with Image.open(crossval / "reliability.png") as image:
        assert image.format == "PNG"
    doc = json.loads((crossval / "results.json").read_text())
    assert doc["crossval"]["folds"] == 2 and doc["crossval"]["posts"] == 200
    assert sum(s["test"] for s in doc["crossval"]["fold_sizes"]) == 200
    everything = doc["results"]
    assert {r["regime"] for r in everything} == {"clean", "product"}
    rows = [r for r in everything if r["regime"] == "clean"]
    assert {r["fold"] for r in rows} == {0, 1}
    for key in ("ece", "ece_raw", "nll", "nll_raw", "confidence", "temperature"):
        assert all(key in r for r in rows), key
    assert all(0 <= r["ece"] <= 1 and r["temperature"] > 0 for r in rows)
    tests = {r["test"] for r in rows}
    assert tests == {"clean", *(f"{m}/{s}" for m in ("image", "text") for s in ("C", "D", "C+D")), *DAMAGE}
    methods = {r["method"] for r in rows}
    assert methods == {"drf", "concat", "concat_dropout", "text_only", "image_only", "router", "gated_router"}
    for fold in (0, 1):
        for method in methods:
            assert {r["test"] for r in rows if r["fold"] == fold and r["method"] == method} == tests
    gated = [r for r in rows if r["method"] == "gated_router"]
    assert all("gate_image" in r and "gate_text" in r for r in gated)
    # Reliability bins are kept for the diagram's conditions only.
    assert {r["test"] for r in rows if "reliability" in r} == {"clean", "text/typos"}
    auroc_tests = {r["test"] for r in doc["damage_auroc"]}
    assert "text/typos" in auroc_tests and "image/D" not in auroc_tests
    truncated = doc["disruption"]["damage image/truncated"]
    assert truncated["became_missing"] == 200 - truncated["skipped_single_modality"]  # PNG cut short: missing
    assert all(0 <= r["auroc"] <= 1 for r in doc["damage_auroc"] if r["auroc"] is not None)
    assert all("margin" in c for c in doc["targets"])


def test_the_product_regime_trains_every_method_again_and_is_judged_on_its_own_targets(
    crossval: Path,
) -> None:
    doc = json.loads((crossval / "results.json").read_text())
    product = [r for r in doc["results"] if r["regime"] == "product"]
    clean_tests = {r["test"] for r in doc["results"] if r["regime"] == "clean"}
    methods = {"drf", "concat", "concat_dropout", "text_only", "image_only", "router", "gated_router"}
    assert {r["method"] for r in product} == methods
    for fold in (0, 1):
        for method in methods:
            assert {r["test"] for r in product if r["fold"] == fold and r["method"] == method} == clean_tests

    # Trained differently: the same fold, seed and test give other scores than the clean-trained model's.
    def nll(regime: str) -> list[float]:
        return [r["nll"] for r in doc["results"] if (r["method"], r["regime"]) == ("drf", regime)]

    assert nll("product") != nll("clean")
    assert {r["regime"] for r in doc["quality_auroc"]} == {"clean", "product"}
    names = {c["target"] for c in doc["product_targets"]}
    assert "clean ≥ 74 %" in names and "quality AUROC image (C) ≥ 0.93" in names
    assert any(n.startswith("text/typos ≥ Image only − 1") for n in names)
    assert not any(n.startswith("image/mismatched") for n in names)  # a swapped image is not damage
    for check in doc["product_targets"]:
        assert check["met"] == (check["margin"] >= 0)
    text = (crossval / "report.md").read_text()
    assert "## Regime `product`: trained on damaged posts too" in text
    assert "### Targets of the product model" in text


def test_cv_report_shows_every_condition_with_calibration_auroc_and_the_gated_router(crossval: Path) -> None:
    text = (crossval / "report.md").read_text()
    for heading in (
        "## Accuracy (%)",
        "## DRF against the best baseline and the intact specialist",
        "## Calibration",
        "## Targets (cross-validated means)",
        "### Where DRF falls below a baseline or the intact specialist",
    ):
        assert heading in text
    assert "Quality-gated router" in text and "mean ± sample std over 2 (fold, seed) runs" in text
    for condition in ("| clean |", "| image/truncated |", "| text/typos |", "| image/C+D |"):
        assert condition in text
    assert "n/a (modality missing)" in text  # truncated: every image missing, no quality to score


def test_the_report_is_written_again_from_results_json_alone(crossval: Path, tmp_path: Path) -> None:
    write_cv_report(results_from_json(crossval / "results.json"), tmp_path)
    assert (tmp_path / "report.md").read_text() == (crossval / "report.md").read_text()


class FakeDRF(nn.Module):
    """Publishes log q = the first feature of each modality."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward_features(self, features: FeatureTable) -> SimpleNamespace:
        return SimpleNamespace(log_quality_image=features.image[:, 0], log_quality_text=features.text[:, 0])


def _router() -> Router:
    torch.manual_seed(0)
    heads = [
        BaselineHead(kind, ["a", "b", "c"], torch.zeros(4), torch.zeros(3), dim=4).eval()
        for kind in ("concat", "text_only", "image_only")
    ]
    return Router(*heads)


def test_gated_router_sends_a_post_below_a_gate_to_the_intact_modalitys_specialist() -> None:
    router = _router()
    gated = GatedRouter(FakeDRF(), router, gate_image=-1.0, gate_text=-1.0)  # type: ignore[arg-type]
    image, text = torch.randn(5, 4), torch.randn(5, 3)
    image[:, 0] = torch.tensor([0.0, -2.0, 0.0, -2.0, -2.0])  # log q image
    text[:, 0] = torch.tensor([0.0, 0.0, -2.0, -2.0, 0.0])  # log q text
    present = torch.ones(5, dtype=torch.bool)
    image_present = torch.tensor([True, True, True, True, False])  # post 4 has no image
    features = FeatureTable(image, text, image_present, present)
    logits = gated.forward_features(features).logits
    concat, text_only, image_only = (
        m.forward_features(features).logits for m in (router.concat, router.text_only, router.image_only)
    )
    expected: list[Tensor] = [concat[0], text_only[1], image_only[2], concat[3], text_only[4]]
    assert torch.allclose(logits, torch.stack(expected))
    never = GatedRouter(FakeDRF(), router)  # type: ignore[arg-type]  # gates at -inf: the plain router
    assert torch.allclose(never.forward_features(features).logits, router.forward_features(features).logits)


def test_gates_are_picked_on_dev_to_route_low_quality_posts_to_the_specialist() -> None:
    router = _router()
    gated = GatedRouter(FakeDRF(), router)  # type: ignore[arg-type]
    n = 40
    image, text = torch.randn(n, 4), torch.randn(n, 3)
    image[:, 0] = torch.where(torch.arange(n) < 20, torch.tensor(0.0), torch.tensor(-5.0))  # half damaged
    text[:, 0] = 0.0
    present = torch.ones(n, dtype=torch.bool)
    features = FeatureTable(image, text, present, present)
    concat = router.concat.forward_features(features).logits.argmax(-1)
    text_only = router.text_only.forward_features(features).logits.argmax(-1)
    # Labels only the text specialist gets right on the damaged half, only concat on the intact half.
    labels = torch.where(torch.arange(n) < 20, concat, text_only)
    assert bool((concat[20:] != text_only[20:]).any())
    gate_image, gate_text = choose_gates(gated, [FeatureTable(image, text, present, present, labels)])
    assert -5.0 < gate_image <= 0.0 and gate_text == float("-inf")


def tiny_config(root: Path, **overrides: Any) -> EvalConfig:
    """A quick cross-validation of the synthetic data set with the tiny encoders, one seed, one epoch."""
    settings: dict[str, Any] = {
        "data": f"jsonl:{root}",
        "encoders": "tiny",
        "seeds": (0,),
        "dim": 16,
        "queue_size": 16,
        "epochs": 1,
        "batch_size": 64,
        "fixed_settings": ("C",),
        "random_settings": (),
        "ablations": (),
        "compare_paper": False,
        "damage": ("text/typos",),
    }
    return EvalConfig(**{**settings, **overrides})


def test_features_are_encoded_once_for_all_folds(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    config = tiny_config(root, baselines=("concat", "text_only", "image_only", "gated_router"), folds=3)
    crossval = CrossValidation(config, tmp_path / "cache", progress=False)
    encoded = crossval.pooled_conditions

    def encode_once(samples: dict[str, list[Sample]]) -> dict[str, FeatureTable]:
        tables = encoded(samples)

        def refuse(*args: object) -> FeatureTable:
            raise AssertionError("a fold encoded features")

        crossval._encode_samples = refuse  # type: ignore[method-assign]
        return tables

    crossval.pooled_conditions = encode_once  # type: ignore[method-assign]
    crossval.execute()
    assert {r["fold"] for r in crossval.results} == {0, 1, 2}
    assert sum(s["test"] for s in crossval.fold_sizes) == 200


def test_a_finetuned_fold_trains_its_text_encoder_on_its_training_posts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two-stage fine-tuning in cross-validation: each fold fine-tunes its own copy of the text encoder on its
    training posts (never its test posts), every head of the fold is scored on texts encoded by that copy, and
    the stage-one model is reported as drf-e2e."""
    import core.evaluation.crossval as crossval_module

    root = make_dataset(tmp_path / "data")
    config = tiny_config(
        root,
        baselines=("concat", "text_only", "image_only"),
        folds=2,
        regimes=("clean", "product"),
        finetune_text=True,
        finetune_epochs=1,
    )
    crossval = CrossValidation(config, tmp_path / "cache", progress=False)
    frozen_text = crossval.base.text_encoder.state_dict()
    seen: list[tuple[str, set[str], object]] = []
    finetune = crossval_module.finetune_text_encoder

    def spy(model, train, dev, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = finetune(model, train, dev, *args, **kwargs)
        seen.append((kwargs["objective"], {s.id for s in train} | {s.id for s in dev}, model))
        return result

    monkeypatch.setattr(crossval_module, "finetune_text_encoder", spy)
    crossval.execute()

    ids = [s.id for s in crossval.posts]
    # Fold 0: the two-stage text classifier, then DRF end to end; fold 1: the text classifier only.
    assert [(objective, fold) for fold, (objective, _, _) in zip((0, 0, 1), seen, strict=True)] == [
        ("text", 0),
        ("drf", 0),
        ("text", 1),
    ]
    for fold, (_, trained_on, model) in zip((0, 0, 1), seen, strict=True):
        test_ids = {ids[i] for i in crossval.folds[fold]}
        assert trained_on and not trained_on & test_ids
        weights = model.text_encoder.state_dict()  # type: ignore[attr-defined]
        assert any(not torch.equal(weights[k], frozen_text[k]) for k in frozen_text)
    # The frozen encoders are untouched: fine-tuning worked on copies.
    assert all(torch.equal(v, crossval.base.text_encoder.state_dict()[k]) for k, v in frozen_text.items())
    e2e = [r for r in crossval.results if r["method"] == "drf-e2e"]
    assert {(r["fold"], r["regime"]) for r in e2e} == {(0, "clean")}
    assert {r["test"] for r in e2e} >= {"clean", "text/C", "text/typos"}
    for regime in ("clean", "product"):
        assert {r["fold"] for r in crossval.results if r["method"] == "drf" and r["regime"] == regime} == {
            0,
            1,
        }
    outcome = crossval.outcome()
    assert "drf-e2e" in outcome.methods
    assert "fine-tuned per fold" in outcome.describe["encoders"]
    assert outcome.describe["timings"]["finetune_seconds"] > 0
    paths = write_cv_report(outcome, tmp_path / "report")
    assert "DRF, fine-tuned end to end" in paths["markdown"].read_text()


def test_finetuning_is_refused_outside_cross_validation() -> None:
    with pytest.raises(ValueError, match="cross-validation only"):
        EvalConfig(encoders="tiny", finetune_text=True)
    with pytest.raises(ValueError, match="finetune_layers"):
        EvalConfig(encoders="tiny", folds=2, finetune_layers=2)
    with pytest.raises(ValueError, match="finetune_e2e_folds"):
        EvalConfig(encoders="tiny", folds=2, finetune_text=True, finetune_e2e_folds=(2,))
