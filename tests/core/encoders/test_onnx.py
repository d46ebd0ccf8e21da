"""The ONNX Runtime path of the encoders (image_runtime / text_runtime="onnxruntime"): same features as eager torch.

It is a speed switch (bench/levers.py), so what a user relies on is that it changes nothing else: the features
match eager within float tolerance, the daisy is still a daisy, training and autograd never go through it, and
loading new weights (a checkpoint) is reflected in what it computes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("onnxruntime")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from core.encoders import (  # noqa: E402
    ONNX_CACHE_ENV,
    ImagePreprocessing,
    configure_cpu_inference,
    create_encoders,
    onnx_cache_dir,
)
from core.encoders.networks import TimmImageEncoder  # noqa: E402
from core.inference import Predictor  # noqa: E402
from core.model import create_model  # noqa: E402

TOLERANCE = 1e-4  # float32 kernels differ in summation order; features are O(1)
TEXT_TOLERANCE = 1e-5  # MiniLM's export, attention mask and pooling in the graph, matches to ~1e-6


@pytest.fixture(autouse=True, scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Exports go to a scratch cache, shared by this module's tests (the offline ones reuse it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ONNX_CACHE_ENV, str(tmp_path_factory.mktemp("onnx")))
        yield


def small_encoder(runtime: str, seed: int = 0) -> TimmImageEncoder:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    preprocessing = ImagePreprocessing(size=64, mean=(0.5,) * 3, std=(0.5,) * 3)  # type: ignore[arg-type]
    return TimmImageEncoder(model, preprocessing, runtime=runtime).eval()


def test_offline_onnx_features_match_eager_on_real_photos() -> None:
    onnx = create_encoders("offline", image_runtime="onnxruntime").image.eval()
    eager = create_encoders("offline").image.eval()
    photos = [Image.fromarray(sklearn_datasets.load_sample_image(n)) for n in ("flower.jpg", "china.jpg")]
    pixels = torch.stack([eager.preprocess(p) for p in photos * 2])  # batch 4: not the traced batch size
    with torch.inference_mode():
        got, want = onnx(pixels), eager(pixels)
    assert got.shape == want.shape == (4, 1280)
    assert torch.allclose(got, want, atol=TOLERANCE, rtol=0)
    assert onnx._session is not None  # the fast path was really taken


def test_predictions_are_the_same_with_either_runtime() -> None:
    labels = ["negative", "neutral", "positive"]
    torch.manual_seed(1)
    eager = create_model("offline", labels)
    onnx = create_model("offline", labels, encoder_options={"image_runtime": "onnxruntime"})
    onnx.load_state_dict(eager.state_dict())
    photo = Image.fromarray(sklearn_datasets.load_sample_image("flower.jpg"))
    out = []
    for model in (eager, onnx):
        predictor = Predictor.from_model(model)
        batch = predictor.prepare([predictor.preprocess_image(photo), None], ["what a lovely day", "meh"])
        out.append(predictor.predict(batch))
    assert out[0].labels == out[1].labels
    assert abs(out[0].probabilities - out[1].probabilities).max() < 1e-4
    assert abs(out[0].image_features - out[1].image_features).max() < 1e-4


def test_training_and_autograd_take_the_torch_path() -> None:
    encoder = small_encoder("onnxruntime")
    pixels = torch.randn(2, 3, 64, 64)
    encoder.train()
    assert encoder(pixels).requires_grad  # a gradient flows: not an ONNX Runtime output
    encoder.eval()
    with torch.no_grad():
        encoder(pixels)
    assert encoder._session is not None


def test_loading_new_weights_re_exports() -> None:
    encoder = small_encoder("onnxruntime", seed=0)
    checkpoint = small_encoder("torch", seed=1)  # other weights, as a checkpoint would bring
    pixels = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        before = encoder(pixels)
        encoder.load_state_dict(checkpoint.state_dict())
        after, want = encoder(pixels), checkpoint(pixels)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, want, atol=TOLERANCE, rtol=0)


def test_copies_do_not_share_the_session() -> None:
    encoder = small_encoder("onnxruntime")
    with torch.inference_mode():
        encoder(torch.randn(1, 3, 64, 64))
    clone = copy.deepcopy(encoder)
    assert clone._session is None and clone.runtime == "onnxruntime"
    with torch.inference_mode():
        assert clone(torch.randn(2, 3, 64, 64)).shape == (2, encoder.dim)


def test_unknown_runtime_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        small_encoder("tensorrt")
    with pytest.raises(ValueError, match="unknown runtime"):
        create_encoders("offline", image_runtime="tensorrt")
    with pytest.raises(ValueError, match="unknown runtime"):
        create_encoders("offline", text_runtime="tensorrt")


def test_serving_settings_switch_a_torch_checkpoint_to_onnxruntime(tmp_path) -> None:
    from core.checkpoint import save_checkpoint
    from stream.components import load_predictor
    from stream.settings import load_settings

    torch.manual_seed(2)
    path = tmp_path / "offline.pt"
    save_checkpoint(create_model("offline", ["negative", "neutral", "positive"], dim=32), path)
    photo = Image.fromarray(sklearn_datasets.load_sample_image("china.jpg"))
    results = {}
    for runtime in ("checkpoint", "onnxruntime"):
        settings = load_settings(flags={"model": {"image_runtime": runtime, "device": "cpu"}})
        predictor = load_predictor(settings, path)
        results[runtime] = predictor.predict(predictor.prepare([predictor.preprocess_image(photo)], ["nice"]))
        assert predictor.model.image_encoder.runtime == (
            "torch" if runtime == "checkpoint" else "onnxruntime"
        )
    assert predictor.model.image_encoder._session is not None  # the ONNX path really ran
    assert abs(results["checkpoint"].probabilities - results["onnxruntime"].probabilities).max() < 1e-4


def test_serving_without_the_built_files_exports_them_itself_and_says_so(tmp_path, caplog) -> None:
    from core.checkpoint import save_checkpoint

    model = create_model("offline", ["negative", "neutral", "positive"], dim=32).eval()
    with torch.no_grad():
        model.image_encoder.model.conv_stem.weight.mul_(1.01)  # weights no other test has exported
    save_checkpoint(model, tmp_path / "offline.pt")
    predictor = Predictor.from_checkpoint(tmp_path / "offline.pt", "cpu", image_runtime="onnxruntime")
    assert "exporting in this process" in caplog.text
    encoder = predictor.model.image_encoder
    assert encoder.model is None  # the torch copy built for the export is gone again
    photo = Image.fromarray(sklearn_datasets.load_sample_image("flower.jpg"))
    pixels = encoder.preprocess(photo).unsqueeze(0)
    with torch.inference_mode():
        assert torch.allclose(encoder(pixels), model.image_encoder.model(pixels), atol=TOLERANCE, rtol=0)


def test_tiny_encoders_refuse_a_runtime_switch_clearly(tmp_path) -> None:
    from core.checkpoint import save_checkpoint

    save_checkpoint(create_model("tiny", ["a", "b"]), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="no switchable runtime"):
        Predictor.from_checkpoint(tmp_path / "tiny.pt", "cpu", image_runtime="onnxruntime")


TEXTS = [
    "what a lovely day at the beach with friends #summer",
    "meh",
    "",  # only [CLS] [SEP]: the most padding in the batch
    "RT @someone: terrible service, never again!!! http://t.co/abc " * 12,  # truncated at max_length
    "ok",
]


# The export was traced at batch 2 on a padded pair; 19 rows of mixed lengths span three length-ordered calls.
@pytest.mark.parametrize("rows", [1, 3, 5, 19])
def test_offline_text_onnx_matches_torch_on_padded_batches(rows: int) -> None:
    """The earlier export differed by up to 0.45; this one takes the attention mask as an input with dynamic batch
    and sequence axes and pools inside the graph, so padded rows match too, and each feature row is its own
    text's after the texts were ordered by length into calls."""
    onnx = create_encoders("offline", text_runtime="onnxruntime").text.eval()
    eager = create_encoders("offline").text.eval()
    inputs = eager.tokenize([TEXTS[row % len(TEXTS)] + " !" * row for row in range(rows)])
    with torch.inference_mode():
        got, want = onnx(inputs), eager(inputs)
    assert got.shape == want.shape == (rows, 384)
    assert float((got - want).abs().max()) < TEXT_TOLERANCE
    assert onnx._session is not None and onnx._session.precision == "fp32"


def test_exports_are_cached_on_disk_and_reused() -> None:
    """A second encoder with the same weights loads the cached file instead of exporting again."""
    first = create_encoders("offline", text_runtime="onnxruntime").text.eval()
    inputs = first.tokenize(TEXTS[:2])
    with torch.inference_mode():
        first(inputs)
    files = sorted(onnx_cache_dir().glob("text-fp32-*.onnx"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = create_encoders("offline").text.eval()
    configure_cpu_inference(second, runtime="onnxruntime")
    with torch.inference_mode():
        second(inputs)
    assert sorted(onnx_cache_dir().glob("text-fp32-*.onnx")) == files and files[0].stat().st_mtime_ns == stamp


def test_serving_settings_switch_the_text_encoder_to_onnxruntime(tmp_path) -> None:
    from core.checkpoint import save_checkpoint
    from stream.components import load_predictor
    from stream.settings import load_settings

    path = tmp_path / "offline.pt"
    save_checkpoint(create_model("offline", ["negative", "neutral", "positive"], dim=32), path)
    model = {"text_runtime": "onnxruntime", "image_runtime": "checkpoint", "device": "cpu"}
    predictor = load_predictor(load_settings(flags={"model": model}), path)
    assert predictor.model.text_encoder.runtime == "onnxruntime"
    assert predictor.model.image_encoder.runtime == "torch"


def test_default_settings_serve_both_offline_encoders_through_onnxruntime(tmp_path, caplog) -> None:
    """A CPU worker with no runtime setting takes the fast path: ONNX Runtime fp32 for both encoders, from the
    files training put beside the checkpoint (no export in the serving process), and says so; same answers."""
    from core.checkpoint import save_checkpoint
    from core.encoders.__main__ import prepare_cpu_serving
    from stream.components import load_predictor
    from stream.settings import load_settings

    torch.manual_seed(3)
    path = tmp_path / "offline.pt"
    save_checkpoint(create_model("offline", ["negative", "neutral", "positive"], dim=32), path)
    files = prepare_cpu_serving(path)
    assert sorted(f.parent for f in files) == [tmp_path / "offline.pt.onnx"] * 2
    photo = Image.fromarray(sklearn_datasets.load_sample_image("china.jpg"))
    results = {}
    for runtime in ("auto", "checkpoint"):
        caplog.clear()
        with caplog.at_level("INFO"):
            settings = load_settings(
                flags={"model": {"image_runtime": runtime, "text_runtime": runtime, "device": "cpu"}}
            )
            predictor = load_predictor(settings, path)
        results[runtime] = predictor.predict(predictor.prepare([predictor.preprocess_image(photo)], ["nice"]))
        if runtime == "auto":
            assert load_settings().model.image_runtime == load_settings().model.text_runtime == "auto"
            assert predictor.runtime_summary() == "image onnxruntime fp32, text onnxruntime fp32"
            assert predictor.model.image_encoder.onnx_only is not None  # no torch copy in memory
            assert predictor.model.text_encoder.onnx_only is not None
            assert "exporting in this process" not in caplog.text
        else:
            assert predictor.runtime_summary() == "image torch fp32, text torch fp32"
        assert f"encoders: {predictor.runtime_summary()}" in caplog.text
    assert abs(results["auto"].probabilities - results["checkpoint"].probabilities).max() < 1e-4
    assert results["auto"].labels == results["checkpoint"].labels


def test_auto_runtime_passes_over_encoders_without_an_export(tmp_path) -> None:
    from core.checkpoint import save_checkpoint
    from core.encoders.__main__ import prepare_cpu_serving

    save_checkpoint(create_model("tiny", ["a", "b"]), tmp_path / "tiny.pt")
    assert prepare_cpu_serving(tmp_path / "tiny.pt") == []
    predictor = Predictor.from_checkpoint(
        tmp_path / "tiny.pt", "cpu", image_runtime="auto", text_runtime="auto"
    )
    assert predictor.runtime_summary() == "image torch on cpu, text torch on cpu"
