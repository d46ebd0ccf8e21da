"""DRFModel with the tiny encoders and the Predictor API the runtime codes against."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from training_data import tiny_model_with_queues

from core.drf import QueueStats
from core.inference import Predictor
from core.model import ABLATIONS, DRFModel, FeatureTable, PreparedBatch, create_model

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture
def model() -> DRFModel:
    return tiny_model_with_queues(LABELS)


@pytest.fixture
def predictor(model: DRFModel) -> Predictor:
    return Predictor.from_model(model)


def picture(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_preprocessing_belongs_to_the_encoder(predictor: Predictor) -> None:
    tensor = predictor.preprocess_image(picture((255, 0, 0), (90, 40)).convert("L"))
    assert tensor.shape == (3, 32, 32)  # any size and mode -> RGB at the encoder's size
    assert tensor.min() >= -1 and tensor.max() <= 1  # tiny encoder normalises with mean = std = 0.5
    assert predictor.normalise_text("  hi there \n") == "hi there"
    assert predictor.normalise_text(" \t ") is None and predictor.normalise_text(None) is None


def test_prepare_marks_missing_modalities_and_pads_dynamically(predictor: Predictor) -> None:
    image = predictor.preprocess_image(picture((0, 128, 255)))
    batch = predictor.prepare([image, None, image], ["good", "a much longer text of seven words", "   "])
    assert batch.image_present.tolist() == [True, False, True]
    assert batch.text_present.tolist() == [True, True, False]
    assert batch.pixel_values[1].abs().sum() == 0
    assert batch.text_inputs["input_ids"].shape == (3, 7)  # padded to the longest text, not a fixed length


def test_prepare_rejects_bad_input(predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        predictor.prepare([None, None], ["x"])
    with pytest.raises(ValueError, match=r"\[3, 32, 32\]"):
        predictor.prepare([torch.zeros(3, 64, 64)], ["x"])
    with pytest.raises(ValueError, match="empty"):
        predictor.prepare([], [])
    with pytest.raises(TypeError, match="str or None"):
        predictor.prepare([None], [42])  # type: ignore[list-item]


def test_predict_reports_labels_quality_recovery_and_abstention(predictor: Predictor) -> None:
    image = predictor.preprocess_image(picture((10, 200, 30)))
    batch = predictor.prepare([image, image, None, None], ["lovely day", None, "awful", None])
    result = predictor.predict(batch)
    assert result.labels[3] is None and result.labels[0] in LABELS and result.labels[2] in LABELS
    assert result.abstained.tolist() == [False, False, False, True]
    assert result.recovered == [None, "text", "image", None]
    assert result.probabilities.shape == (4, 3) and result.probabilities.dtype == np.float32
    assert np.allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert np.isnan(result.quality_image[[2, 3]]).all() and np.isnan(result.quality_text[[1, 3]]).all()
    present_quality = np.concatenate([result.quality_image[:2], result.quality_text[[0, 2]]])
    assert ((present_quality > 0) & (present_quality <= 1)).all()
    # Columns: the three terms of (12), then the image alone and the text alone (the default head's specialist terms).
    assert (result.fusion_weights[0] > 0).all()  # both present: every term exists
    assert (result.fusion_weights[1] > 0).tolist() == [
        False,
        True,
        False,
        True,
        False,
    ]  # image + recovered text
    assert (result.fusion_weights[2] > 0).tolist() == [
        False,
        False,
        True,
        False,
        True,
    ]  # recovered image + text
    assert (result.fusion_weights[3] == 0).all()
    assert np.allclose(result.fusion_weights[:3].sum(axis=1), 1.0, atol=1e-6)
    assert result.image_features.shape == (4, 32) and (result.image_features[2:] == 0).all()
    assert not result.image_accepted[2:].any() and not result.text_accepted[[1, 3]].any()


def test_predict_is_deterministic_and_never_encodes_a_missing_image(predictor: Predictor) -> None:
    image = predictor.preprocess_image(picture((200, 100, 0)))
    batch = predictor.prepare([image, None], ["fine", "meh"])
    first, second = predictor.predict(batch), predictor.predict(batch)
    assert np.array_equal(first.probabilities, second.probabilities)
    batch.pixel_values[1] = float("nan")  # whatever sits in an absent row is ignored
    third = predictor.predict(batch)
    assert np.array_equal(first.probabilities, third.probabilities)


def test_reference_stats_drive_quality_and_are_validated(predictor: Predictor) -> None:
    image = predictor.preprocess_image(picture((0, 0, 0)))
    batch = predictor.prepare([image], ["hello"])
    features = predictor.predict(batch).image_features[0]
    stats = predictor.reference_stats()
    centred = QueueStats(
        torch.from_numpy(features), torch.tensor(1.0), torch.tensor(0.5), count=16, capacity=16
    )
    predictor.set_reference_stats({"image": centred, "text": stats["text"]})
    result = predictor.predict(batch)
    assert result.quality_image[0] == pytest.approx(1.0)  # the image sits exactly on the reference mean
    assert torch.equal(predictor.reference_stats()["image"].mean, torch.from_numpy(features))
    with pytest.raises(ValueError, match="keys"):
        predictor.set_reference_stats({"image": centred})
    wrong_dim = QueueStats(torch.zeros(5), torch.tensor(1.0), torch.tensor(0.5), 16, 16)
    with pytest.raises(ValueError, match=r"\[32\] mean"):
        predictor.set_reference_stats({"image": wrong_dim, "text": stats["text"]})
    bad_sigma = QueueStats(torch.zeros(32), torch.tensor(math.nan), torch.tensor(0.5), 16, 16)
    with pytest.raises(ValueError, match="finite"):
        predictor.set_reference_stats({"image": stats["image"], "text": bad_sigma})


def test_checkpoint_queues_are_the_model_queues(model: DRFModel, predictor: Predictor) -> None:
    queues = predictor.checkpoint_queues()
    assert torch.equal(queues["image"], model.head.image_queue.contents())
    assert queues["text"].shape == (8, 32)


def test_forward_equals_head_only_forward_on_cached_features(model: DRFModel) -> None:
    model.eval()
    predictor = Predictor.from_model(model)
    image = predictor.preprocess_image(picture((1, 2, 3)))
    batch = predictor.prepare([image, None, image], ["a", "b c", None])
    image_features, text_features = model.encode_batch(batch)
    with torch.no_grad():
        direct = model(batch)
        cached = model.forward_features(
            FeatureTable(image_features, text_features, batch.image_present, batch.text_present)
        )
    assert torch.equal(direct.logits, cached.logits)
    assert image_features.shape == (3, 32) and image_features[1].abs().sum() == 0


def test_training_step_updates_head_not_frozen_encoders() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", LABELS, queue_size=8).train()
    assert (
        not model.image_encoder.training and not model.text_encoder.training
    )  # frozen encoders stay in eval
    groups = model.parameter_groups(encoder_lr=2e-5, head_lr=2e-4)
    assert [g["lr"] for g in groups] == [2e-4]  # frozen encoders have nothing to optimise
    batch = PreparedBatch(
        torch.randn(4, 3, 32, 32),
        torch.tensor([True, True, False, True]),
        model.text_encoder.tokenize(["a", "b", "c", "d"]),
        torch.tensor([True, False, True, True]),
    )
    out = model(batch, labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert model.image_projection.weight.grad is not None and model.head.fusion[0].weight.grad is not None
    accepted_v, accepted_t = model.update_queues(out)
    assert accepted_v.tolist() == [True, True, False, True] and len(model.head.text_queue) == 3

    tuned = create_model("tiny", LABELS, freeze_encoders=False).train()
    assert tuned.image_encoder.training
    assert [g["lr"] for g in tuned.parameter_groups(encoder_lr=2e-5, head_lr=2e-4)] == [2e-5, 2e-4]


def test_factory_validates_names_labels_and_options() -> None:
    with pytest.raises(ValueError, match="unknown encoder configuration 'vit'"):
        create_model("vit", LABELS)
    with pytest.raises(ValueError, match="distinct"):
        create_model("tiny", ["pos", "pos"])
    with pytest.raises(ValueError, match="unknown DRF options"):
        create_model("tiny", LABELS, no_such_switch=True)
    with pytest.raises(ValueError, match="invalid options"):
        create_model("tiny", LABELS, encoder_options={"colour": "red"})
    for ablation in ABLATIONS:
        assert getattr(create_model("tiny", LABELS, **{ablation: False}).head.config, ablation) is False


def test_a_batch_with_nothing_usable_abstains_on_every_row(predictor: Predictor) -> None:
    result = predictor.predict(predictor.prepare([None, None], [None, "   "]))
    assert result.labels == [None, None] and result.abstained.all()
    assert np.isnan(result.quality_image).all() and np.isnan(result.quality_text).all()
    assert not result.image_accepted.any() and not result.text_accepted.any()
    assert np.array_equal(result.probabilities[0], result.probabilities[1])  # softmax(b) for both


def test_padded_image_batches_give_the_same_features_from_a_few_batch_sizes(model: DRFModel) -> None:
    """On CUDA the Predictor pads image batches to a power of two (each new size costs cuDNN seconds); the
    present posts' features must not change, and the encoder must only ever see the padded sizes."""
    predictor = Predictor.from_model(model)
    colours = [(30 * i, 255 - 20 * i, 90) for i in range(6)]
    images = [predictor.preprocess_image(picture(c)) for c in colours]
    batch = predictor.prepare([images[0], None, *images[1:]], [f"post {i}" for i in range(7)])
    plain = model.encode_batch(batch)
    sizes: list[int] = []
    hook = model.image_encoder.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    model.pad_image_batches = True
    padded = model.encode_batch(batch)
    hook.remove()
    assert sizes == [8]  # 6 present images -> 8 rows
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-5)
    assert Predictor.from_model(model, device="cpu").model.pad_image_batches is False  # CPU: no padding
