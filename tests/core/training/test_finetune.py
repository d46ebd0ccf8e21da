"""Fine-tuning the text encoder (core/training/finetune.py, ``postsense train --finetune text``): the text encoder
trains at its own learning rate and the image encoder does not; images are encoded once, from the cache; the top-N
layer choice, dropout in train mode only, a new cache fingerprint, stage two's features, and a checkpoint that
round-trips the fine-tuned weights. Tiny encoders only (plus a two-layer BERT built from a config, no download).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from training_data import train_with_cli

from core.checkpoint import load_checkpoint, save_checkpoint
from core.encoders.base import TextEncoder, masked_mean
from core.encoders.configs import Encoders
from core.encoders.networks import TinyImageEncoder
from core.inference import Predictor
from core.model import DRFModel, FeatureTable, create_model
from core.training import (
    FINETUNE_ENCODER_LR,
    CachedSource,
    TextFinetuneSource,
    TrainConfig,
    enable_text_finetuning,
    encode_samples,
    feature_cache_for,
    finetune_text_encoder,
    finetuned_feature_cache,
    fit,
    predict_probabilities,
)
from core.training.features import encoder_fingerprint
from core.training.finetune import TextClassifier
from stream.cli import main

CONFIG = TrainConfig(epochs=3, batch_size=16, encoder_lr=1e-2, head_lr=3e-3, min_lr=1e-5, seed=0)


def tiny_model(labels, seed: int = 0) -> DRFModel:
    torch.manual_seed(seed)
    return create_model("tiny", labels, dim=32, queue_size=32)


def state_of(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: Mapping[str, Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def count_image_rows(model: DRFModel) -> dict[str, int]:
    """Counts the images the image encoder is run on (patched on the instance)."""
    counter = {"rows": 0}
    forward = model.image_encoder.forward

    def counting(pixel_values: Tensor) -> Tensor:
        counter["rows"] += int(pixel_values.shape[0])
        return forward(pixel_values)

    model.image_encoder.forward = counting  # type: ignore[method-assign]
    return counter


class TinyBertText(TextEncoder):
    """A two-layer BERT (transformers' BertModel from a config, random weights) behind the project's text encoder
    interface: it has ``model.encoder.layer`` like MiniLM, and dropout."""

    def __init__(self, dim: int = 32, vocab_size: int = 512) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.dim, self.vocab_size = dim, vocab_size
        self.model = BertModel(
            BertConfig(
                vocab_size=vocab_size,
                hidden_size=dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=2 * dim,
                max_position_embeddings=64,
                hidden_dropout_prob=0.3,
                attention_probs_dropout_prob=0.3,
            ),
            add_pooling_layer=False,
        )

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        ids = [
            [1 + zlib.crc32(w.encode()) % (self.vocab_size - 1) for w in t.lower().split()][:32]
            for t in texts
        ]
        width = max([1, *map(len, ids)])
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        for row, row_ids in enumerate(ids):
            input_ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}

    def forward(self, text_inputs: Mapping[str, Tensor]) -> Tensor:
        hidden = self.model(**text_inputs).last_hidden_state
        return masked_mean(hidden, text_inputs["attention_mask"])

    def preprocessing(self) -> dict[str, Any]:
        return {"max_length": 32, "tokenizer": "tiny-bert-crc32", "vocab_size": self.vocab_size}


def bert_model(labels, seed: int = 0) -> DRFModel:
    torch.manual_seed(seed)
    encoders = Encoders("tiny", TinyImageEncoder(32, 32), TinyBertText(32), {})
    return DRFModel(encoders, labels, dim=32, queue_size=32)


def test_the_text_encoder_trains_the_image_encoder_does_not_and_images_are_encoded_once(
    dataset, tmp_path
) -> None:
    model = tiny_model(dataset.label_names)
    train, dev, test = dataset["train"][:64], dataset["dev"][:24], dataset["test"][:16]
    image_cache = feature_cache_for(model, tmp_path)
    fingerprint = encoder_fingerprint(model)
    text_before, image_before, head_before = (
        state_of(m) for m in (model.text_encoder, model.image_encoder, model.head)
    )
    images = count_image_rows(model)

    result = finetune_text_encoder(model, train, dev, CONFIG, image_cache)

    assert len(result.history) == 3 and 1 <= result.best_epoch <= 3
    assert changed(text_before, model.text_encoder) == set(text_before)  # every text weight moved
    assert changed(image_before, model.image_encoder) == set()
    assert changed(head_before, model.head)
    # Each image was encoded once, when the sources were made: not again in any of the 3 epochs nor for dev.
    assert images["rows"] == len(train) + len(dev)
    # Left frozen (nothing requires grad), in eval mode, with a record of what was done and a new fingerprint.
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not model.training and not model.text_encoder.training
    assert model.text_finetune == {"layers": "all"} and model.config()["text_finetune"] == {"layers": "all"}
    assert encoder_fingerprint(model) != fingerprint

    # Stage two: texts encoded by the fine-tuned encoder into the new fingerprint's folder; images from the cache.
    cache = finetuned_feature_cache(model, tmp_path, image_cache)
    assert cache.directory == feature_cache_for(model, tmp_path).directory != image_cache.directory
    images["rows"] = 0
    table = encode_samples(model, [*train, *test], cache)
    assert images["rows"] == len(test)  # only the images not cached yet
    with torch.inference_mode():
        expected = model.encode_texts(model.text_encoder.tokenize([s.text for s in test]))
    torch.testing.assert_close(table.text[len(train) :], expected)
    assert list(cache.directory.glob("image-*.pt")) == [] and list(cache.directory.glob("text-*.pt"))


def test_head_and_text_encoder_get_their_own_learning_rates(dataset, tmp_path) -> None:
    model = tiny_model(dataset.label_names)
    enable_text_finetuning(model)
    groups = model.parameter_groups(encoder_lr=3e-5, head_lr=1e-3)
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    assert [g["lr"] for g in groups] == [3e-5, 1e-3]
    assert {id(p) for p in groups[0]["params"]} == text_ids
    head_ids = {id(p) for p in groups[1]["params"]}
    assert head_ids and not head_ids & text_ids
    assert not head_ids & {id(p) for p in model.image_encoder.parameters()}

    # And they act: at a vanishing encoder rate the text encoder stays put while the head learns.
    source_model = tiny_model(dataset.label_names)
    enable_text_finetuning(source_model)
    image_cache = feature_cache_for(source_model, tmp_path)
    text_before, head_before = state_of(source_model.text_encoder), state_of(source_model.head)
    slow = TrainConfig(epochs=1, batch_size=16, encoder_lr=1e-12, head_lr=3e-3, min_lr=0.0)
    train = TextFinetuneSource(source_model, dataset["train"][:48], image_cache)
    dev = TextFinetuneSource(source_model, dataset["dev"][:16], image_cache)
    fit(source_model, train, dev, slow)
    moved = max(
        float((v - text_before[k]).abs().max()) for k, v in source_model.text_encoder.state_dict().items()
    )
    assert moved < 1e-8
    assert changed(head_before, source_model.head)


def test_zero_layers_trains_nothing_of_the_text_encoder(dataset, tmp_path) -> None:
    model = tiny_model(dataset.label_names)
    fingerprint = encoder_fingerprint(model)
    text_before, head_before = state_of(model.text_encoder), state_of(model.head)
    image_cache = feature_cache_for(model, tmp_path)
    finetune_text_encoder(model, dataset["train"][:48], dataset["dev"][:16], CONFIG, image_cache, layers=0)
    assert changed(text_before, model.text_encoder) == set()
    assert changed(head_before, model.head)
    assert encoder_fingerprint(model) == fingerprint and model.text_finetune is None
    with pytest.raises(ValueError, match=">= 0"):
        enable_text_finetuning(model, -1)


def test_the_text_objective_trains_the_text_encoder_with_a_classifier_of_its_own(dataset, tmp_path) -> None:
    """Stage one of the two-stage recipe: the text encoder learns the labels through a linear classifier; the DRF
    head (trained afterwards on the fine-tuned features) is left as it was."""
    model = tiny_model(dataset.label_names)
    fingerprint = encoder_fingerprint(model)
    text_before, head_before = state_of(model.text_encoder), state_of(model.head)
    image_cache = feature_cache_for(model, tmp_path)
    result = finetune_text_encoder(
        model, dataset["train"][:64], dataset["dev"][:24], CONFIG, image_cache, objective="text"
    )
    assert changed(text_before, model.text_encoder)
    assert changed(head_before, model.head) == set()
    assert encoder_fingerprint(model) != fingerprint and not model.text_trainable
    assert len(result.history) == CONFIG.epochs and 0 <= result.best_dev_accuracy <= 100
    with pytest.raises(ValueError, match="objective"):
        finetune_text_encoder(
            model, dataset["train"][:8], dataset["dev"][:8], CONFIG, image_cache, objective="x"
        )


def test_the_text_classifier_learns_only_from_posts_that_have_a_text() -> None:
    model = tiny_model(["negative", "neutral", "positive"])
    classifier = TextClassifier(model)
    text = torch.randn(4, model.text_encoder.dim)
    present = torch.tensor([True, True, False, False])
    table = FeatureTable(
        torch.zeros(4, model.image_encoder.dim), text, torch.ones(4, dtype=torch.bool), present
    )
    labels = torch.tensor([0, 2, 1, 1])
    out = classifier.forward_features(table, labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:2], labels[:2])
    assert out.loss is not None and torch.allclose(out.loss, expected)


def test_top_layers_of_a_bert_text_encoder_train_alone_with_dropout_in_train_mode_only(
    dataset, tmp_path
) -> None:
    model = bert_model(dataset.label_names)
    bert: Any = model.text_encoder.model
    with pytest.raises(ValueError, match="has 2 layers"):
        enable_text_finetuning(model, 3)
    modules = enable_text_finetuning(model, 1)
    assert modules == [bert.encoder.layer[1]]
    # Train mode: the fine-tuned layer's dropout is on, the frozen parts (embeddings, lower layer) stay in eval.
    model.train(True)
    assert (
        bert.encoder.layer[1].training and not bert.encoder.layer[0].training and not bert.embeddings.training
    )
    assert not model.image_encoder.training
    inputs = model.text_encoder.tokenize(["what a great sunny day with friends"] * 2)
    torch.manual_seed(1)
    assert not torch.allclose(model.encode_texts(inputs)[0], model.encode_texts(inputs)[1])
    model.eval()
    with torch.no_grad():
        first, second = model.encode_texts(inputs)
    torch.testing.assert_close(first, second)

    layer0, layer1, embeddings = (
        state_of(m) for m in (bert.encoder.layer[0], bert.encoder.layer[1], bert.embeddings)
    )
    image_cache = feature_cache_for(model, tmp_path)
    finetune_text_encoder(model, dataset["train"][:48], dataset["dev"][:16], CONFIG, image_cache, layers=1)
    assert changed(layer1, bert.encoder.layer[1])
    assert changed(layer0, bert.encoder.layer[0]) == set() and changed(embeddings, bert.embeddings) == set()
    assert model.text_finetune == {"layers": 1}


def test_scoring_during_finetuning_encodes_dev_in_eval_mode_without_gradient(dataset, tmp_path) -> None:
    model = tiny_model(dataset.label_names)
    enable_text_finetuning(model)
    image_cache = feature_cache_for(model, tmp_path)
    train = TextFinetuneSource(model, dataset["train"][:32], image_cache)
    dev = TextFinetuneSource(model, dataset["dev"][:16], image_cache)
    seen: dict[str, list[tuple[bool, bool]]] = {"train": [], "dev": []}

    def spy(name: str, source: TextFinetuneSource) -> None:
        features = source.features

        def recorded(index: Tensor):
            table = features(index)
            seen[name].append((model.text_encoder.training, table.text.requires_grad))
            return table

        source.features = recorded  # type: ignore[method-assign]

    spy("train", train)
    spy("dev", dev)
    fit(model, train, dev, TrainConfig(epochs=2, batch_size=16, encoder_lr=1e-3, head_lr=1e-3))
    assert seen["train"] and set(seen["train"]) == {(True, True)}
    assert seen["dev"] and set(seen["dev"]) == {(False, False)}


def test_a_finetuned_checkpoint_round_trips_its_text_weights_and_predictions(dataset, tmp_path) -> None:
    model = tiny_model(dataset.label_names)
    text_before = state_of(model.text_encoder)
    image_cache = feature_cache_for(model, tmp_path / "cache")
    finetune_text_encoder(model, dataset["train"][:64], dataset["dev"][:24], CONFIG, image_cache)
    save_checkpoint(model, tmp_path / "model.ckpt")
    loaded = load_checkpoint(tmp_path / "model.ckpt").model
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    assert loaded.text_finetune == {"layers": "all"}
    assert encoder_fingerprint(loaded) == encoder_fingerprint(model)
    # The same probabilities, each model encoding the test posts itself (its own caches).
    test = dataset["test"]
    mine = encode_samples(model, test, finetuned_feature_cache(model, tmp_path / "cache", image_cache))
    theirs = encode_samples(loaded, test, feature_cache_for(loaded, tmp_path / "fresh"))
    np.testing.assert_allclose(
        predict_probabilities(model, CachedSource(mine)),
        predict_probabilities(loaded, CachedSource(theirs)),
        atol=1e-6,
    )
    # The ONNX file of the text encoder is keyed by its weights: a fine-tuned encoder gets another file.
    pytest.importorskip("onnxruntime")
    from core.encoders.export import onnx_file_name

    before = onnx_file_name("text", "fp32", "", text_before)
    after = onnx_file_name("text", "fp32", "", model.text_encoder.state_dict())
    assert before != after == onnx_file_name("text", "fp32", "", loaded.text_encoder.state_dict())


def test_finetuning_refuses_an_onnx_text_encoder(dataset) -> None:
    model = tiny_model(dataset.label_names)
    model.text_encoder.runtime = "onnxruntime"  # type: ignore[assignment]  # what an HFTextEncoder's switch holds
    model.text_encoder.precision = "fp32"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="torch runtime"):
        enable_text_finetuning(model)


@pytest.mark.parametrize("objective", ["text", "drf"])
def test_cli_train_finetune_text_writes_a_checkpoint_the_service_loads(
    data_root, tmp_path, capsys, objective
) -> None:
    """Two-stage (default: a text classifier for --finetune-epochs, then the DRF head on the fine-tuned features, in
    the product regime) or end to end (the DRF head with the text encoder, the clean regime)."""
    out, summary = train_with_cli(
        data_root,
        tmp_path,
        capsys,
        "--finetune",
        "text",
        "--finetune-objective",
        objective,
        "--finetune-epochs",
        "1",
    )
    assert summary["text_finetune"] == {"layers": "all"} and len(summary["history"]) == 2
    regime = summary["training"].get("regime")
    assert (regime or {}).get("regime") == ("product" if objective == "text" else None)
    checkpoint = load_checkpoint(out)
    assert checkpoint.metadata["config"]["text_finetune"] == {"layers": "all"}
    # Against the model the command started from (same seed): the text encoder moved, the image encoder did not.
    torch.manual_seed(0)
    start = create_model("tiny", checkpoint.model.labels, queue_size=32)
    assert changed(state_of(start.text_encoder), checkpoint.model.text_encoder)
    assert changed(state_of(start.image_encoder), checkpoint.model.image_encoder) == set()
    # Two feature folders: the images' (the model as created) and the fine-tuned texts'.
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 2 and f"tiny-{encoder_fingerprint(checkpoint.model)}" in folders
    predictor = Predictor.from_checkpoint(out, device="cpu")
    batch = predictor.prepare([None], ["great happy day"])
    assert predictor.predict(batch).labels[0] in ("positive", "neutral", "negative")


def test_cli_finetune_options_are_checked(data_root, tmp_path, capsys) -> None:
    base = ["train", "--data", f"jsonl:{data_root}", "--encoders", "tiny", "--out", str(tmp_path / "m")]
    for extra, message in (
        (["--finetune-layers", "1"], "needs --finetune text"),
        (["--finetune", "text", "--fine-tune"], "both encoders already"),
        (["--finetune-objective", "text"], "needs --finetune text"),
    ):
        with pytest.raises(SystemExit) as done:
            main([*base, *extra])
        assert done.value.code == 2
        assert message in capsys.readouterr().err
    assert FINETUNE_ENCODER_LR == pytest.approx(3e-5)
