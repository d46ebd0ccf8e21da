"""Evaluation: a tiny configuration writes the report files with the paper's tables; baselines pad missing
modalities as the paper does; cells are mean ± sample standard deviation over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_data import make_dataset

from core.evaluation import EvalConfig, aggregate, auroc, run_evaluation
from core.evaluation.baselines import BaselineHead, Router
from core.model import FeatureTable
from stream.cli import main

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EvalConfig]:
    root = make_dataset(tmp_path_factory.mktemp("synthetic"))
    out = tmp_path_factory.mktemp("report")
    config = EvalConfig(
        data=f"jsonl:{root}",
        encoders="tiny",
        seeds=SEEDS,
        dim=32,
        queue_size=32,
        epochs=2,
        batch_size=32,
        head_lr=3e-3,
        ratios=(0.5, 1.0),
        ablations=("gaussian_weights", "expansion"),
        mechanisms=("fusion",),
    )
    run_evaluation(config, out, tmp_path_factory.mktemp("cache"), progress=False)
    return out, config


def test_evaluation_writes_markdown_json_and_png(report) -> None:
    out, _ = report
    assert {p.name for p in out.iterdir()} == {"report.md", "results.json", "figure5.png"}
    with Image.open(out / "figure5.png") as image:
        assert image.format == "PNG" and image.width > 200


def test_report_has_the_papers_tables_with_their_rows_and_captions(report) -> None:
    out, _ = report
    text = (out / "report.md").read_text()
    for heading in (
        "Table 3: without disruption",
        "Table 1: modality-fixed",
        "Table 4: ablations",
        "Figure 5",
    ):
        assert heading in text
    for row in (
        "| image | DRF |",
        "| text | Concat (padded) |",
        "| text | Image only |",
        "| image | w/o Gaussian probability |",
        "| text | w/o image-text expansion |",
    ):
        assert row in text
    assert "| Disrupted | Method | C | D | C+D |" in text
    assert "| fusion = product (paper) |" in text  # the mechanisms table: one switch back to the paper's
    for heading in (
        "## Mechanisms of the robust variant",
        "## Quality scores",
        "## Training diagnostics",
        "## Targets",
    ):
        assert heading in text
    assert "| DRF, paper-literal | first (1) |" in text and "| Router (specialist per post) |" in text
    assert "| Method (C+D) | 0 (clean) | 0.5 | 1 | drop 0.2→1.0 |" in text
    # Every table states data, split, seeds and encoders.
    captions = [line for line in text.splitlines() if line.startswith("*Data:")]
    assert len(captions) == 4
    for caption in captions:
        assert (
            "jsonl:" in caption
            and "test split" in caption
            and "Seeds 0, 1" in caption
            and "Encoders: tiny" in caption
        )


def test_results_json_holds_every_run_per_seed(report) -> None:
    out, config = report
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["sizes"] == {"train": 120, "dev": 40, "test": 40}
    assert doc["config"]["seeds"] == list(SEEDS)
    runs = {(r["method"], r["seed"], r["regime"], r["test"]) for r in doc["results"]}
    clean_methods = [
        "drf",
        "drf-paper",
        "drf-no-gaussian_weights",
        "drf-no-expansion",
        "concat",
        "concat_dropout",
        "router",
        "gated_router",
        "text_only",
        "image_only",
    ]
    tests = ["clean"] + [f"{m}/{s}" for m in ("image", "text") for s in ("C", "D", "C+D")]
    for method in clean_methods:
        for seed in SEEDS:
            for test in tests:
                assert (method, seed, "clean", test) in runs
    for method in ("drf", "concat"):
        for dr in ("0.5", "1"):
            assert (method, 1, f"random C+D dr={dr}", "test") in runs
    # The routers are composed, not trained.
    trained = [r for r in doc["results"] if r["method"] not in ("router", "gated_router")]
    assert all(r["fold"] is None for r in doc["results"])  # a single-split run: no fold
    assert all(0 <= r["accuracy"] <= 100 and 1 <= r["best_epoch"] <= config.epochs for r in trained)
    # DRF runs carry the per-epoch diagnostics of their training.
    history = next(r["history"] for r in doc["results"] if r["method"] == "drf")
    assert len(history) == config.epochs
    for key in (
        "acceptance_image",
        "queue_fill_text",
        "log_q_recovered_image_p50",
        "share_intact",
        "fused_norm",
    ):
        assert all(key in epoch for epoch in history)
    assert {(row["method"], row["seed"]) for row in doc["quality_auroc"]} >= {("drf", s) for s in SEEDS}
    assert all(0 <= row["image"] <= 1 and 0 <= row["text"] <= 1 for row in doc["quality_auroc"])
    assert {c["target"] for c in doc["targets"]} >= {
        "clean ≥ 70 %",
        "image D ≥ router − 0.5",
        "quality AUROC text ≥ 0.9",
    }
    # Modality-fixed disruption hit every test sample: 40 images corrupted in image/C.
    assert doc["disruption"]["fixed image/C"]["test"] == {"image/corrupt": 40}


def test_cells_are_mean_and_sample_std_over_seeds() -> None:
    rows = [
        {"method": "drf", "regime": "clean", "test": "clean", "accuracy": a, "weighted_f1": f}
        for a, f in ((60.0, 50.0), (70.0, 60.0), (80.0, 40.0))
    ]
    cell = aggregate(rows, "drf", "clean", "clean")
    assert cell["accuracy"] == pytest.approx(70.0) and cell["accuracy_sd"] == pytest.approx(10.0)
    assert cell["weighted_f1"] == pytest.approx(50.0) and cell["weighted_f1_sd"] == pytest.approx(10.0)
    assert aggregate(rows, "concat", "clean", "clean") is None


def test_baselines_replace_a_missing_modality_by_the_padding_features() -> None:
    torch.manual_seed(0)
    pad_image, pad_text = torch.randn(8), torch.randn(6)
    head = BaselineHead("concat", ["a", "b"], pad_image, pad_text, dim=4).eval()
    image, text = torch.randn(2, 8), torch.randn(2, 6)
    missing = head.forward_features(
        FeatureTable(image, text, torch.tensor([False, True]), torch.tensor([True, False]))
    ).logits
    both = torch.ones(2, dtype=torch.bool)
    padded = head.forward_features(
        FeatureTable(torch.stack([pad_image, image[1]]), torch.stack([text[0], pad_text]), both, both)
    ).logits
    assert torch.allclose(missing, padded)
    text_only = BaselineHead("text_only", ["a", "b"], pad_image, pad_text, dim=4).eval()
    # A text-only model ignores the image entirely.
    a = text_only.forward_features(FeatureTable(image, text, both, both))
    b = text_only.forward_features(FeatureTable(-image, text, ~both, both))
    assert torch.equal(a.logits, b.logits)
    with pytest.raises(ValueError, match="unknown baseline head"):
        BaselineHead("late_fusion", ["a", "b"], pad_image, pad_text)


def test_router_sends_each_post_to_the_head_of_the_modalities_it_has() -> None:
    torch.manual_seed(0)
    pad_image, pad_text = torch.randn(8), torch.randn(6)
    heads = [
        BaselineHead(kind, ["a", "b", "c"], pad_image, pad_text, dim=4).eval()
        for kind in ("concat", "text_only", "image_only")
    ]
    router = Router(*heads)
    image, text = torch.randn(3, 8), torch.randn(3, 6)
    features = FeatureTable(image, text, torch.tensor([True, False, True]), torch.tensor([True, True, False]))
    routed = router.forward_features(features).logits
    expected = [head.forward_features(features).logits[i] for i, head in enumerate(heads)]
    assert torch.allclose(routed, torch.stack(expected))
    with pytest.raises(ValueError, match="in that order"):
        Router(heads[1], heads[0], heads[2])


def test_modality_dropout_removes_one_modality_in_training_only() -> None:
    torch.manual_seed(0)
    pad_image, pad_text = torch.zeros(8), torch.zeros(6)
    head = BaselineHead("concat_dropout", ["a", "b"], pad_image, pad_text, dim=4)
    head.fusion = torch.nn.Linear(8, 4)  # no dropout: in training mode only the modality dropout is random
    image, text = torch.randn(4000, 8), torch.randn(4000, 6)
    both = torch.ones(4000, dtype=torch.bool)
    head.eval()
    padded_image = head.forward_features(FeatureTable(torch.zeros_like(image), text, both, both)).logits
    padded_text = head.forward_features(FeatureTable(image, torch.zeros_like(text), both, both)).logits
    intact = head.forward_features(FeatureTable(image, text, both, both)).logits
    dropped = head.train().forward_features(FeatureTable(image, text, both, both)).logits
    lost_image = torch.isclose(dropped, padded_image).all(-1)
    lost_text = torch.isclose(dropped, padded_text).all(-1)
    kept = torch.isclose(dropped, intact).all(-1)
    assert bool((lost_image | lost_text | kept).all()) and not bool((lost_image & lost_text).any())
    assert 0.45 < float(kept.float().mean()) < 0.55  # half of the posts keep both modalities
    assert abs(float(lost_image.float().mean()) - float(lost_text.float().mean())) < 0.05


def test_auroc_counts_pairs_ranked_correctly_and_ties_as_half() -> None:
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    assert auroc([3.0, 1.0], [2.0, 0.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])


def test_invalid_evaluation_options_are_reported_clearly(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="seeds must be distinct"):
        EvalConfig(seeds=(0, 0))
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--data", "vader", "--out", str(tmp_path), "--baselines", "svm", "--no-progress"])
    assert done.value.code == 2
    assert "baselines: unknown ['svm']" in capsys.readouterr().err


def test_report_header_names_the_image_model_its_features_came_from() -> None:
    """A report made with --image-model lite1 must not say Lite0: the header is how a reader tells two reports apart."""
    from types import SimpleNamespace

    from core.evaluation.runs import Evaluation

    def header(**options: object) -> str:
        run = SimpleNamespace(
            config=EvalConfig(encoders="offline"), base=SimpleNamespace(encoder_options=options)
        )
        return Evaluation._encoders_description(run)

    assert header(tweets=True).startswith("offline: EfficientNet-Lite0 (ImageNet, 1280-d) + all-MiniLM-L6-v2")
    assert header(tweets=True).endswith("; texts normalised as tweets")
    lite1 = header(image_model="lite1")
    assert "EfficientNet-Lite1 (ImageNet, 1280-d)" in lite1 and "Lite0" not in lite1
