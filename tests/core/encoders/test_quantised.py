"""The int8 encoders (precision="int8"): close to fp32, only on CPU inference, selectable per checkpoint at serve time.

How close is enough is decided on real posts by bench/parity.py (accuracy, label agreement, quality ranks); these
tests hold the mechanics: the int8 model really runs, stays near fp32, never replaces training or autograd, and
the option leaves the fingerprints of existing fp32 checkpoints and feature caches alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn.datasets")

from core.encoders import (  # noqa: E402
    ONNX_CACHE_ENV,
    ImagePreprocessing,
    configure_cpu_inference,
    create_encoders,
    onnx_cache_dir,
    onnx_dir_for,
)
from core.encoders.networks import TimmImageEncoder  # noqa: E402
from core.encoders.quantise import calibration_images  # noqa: E402
from core.model import create_model  # noqa: E402

TWEETS = [
    "what a lovely day at the beach with friends #summer",
    "worst flight ever, four hours on the tarmac and no water",
    "new phone who dis",
    "so proud of my little sister, she graduated today!!",
]


@pytest.fixture(autouse=True, scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ONNX_CACHE_ENV, str(tmp_path_factory.mktemp("onnx")))
        yield


def small_image_encoder(precision: str) -> TimmImageEncoder:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    preprocessing = ImagePreprocessing(size=64, mean=(0.5,) * 3, std=(0.5,) * 3)  # type: ignore[arg-type]
    return TimmImageEncoder(model, preprocessing, precision=precision).eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_int8_text_features_stay_close_to_fp32() -> None:
    fp32 = create_encoders("offline").text.eval()
    int8 = create_encoders("offline", precision="int8").text.eval()
    inputs = fp32.tokenize(TWEETS)
    with torch.inference_mode():
        want, got = fp32(inputs), int8(inputs)
    assert int8._session is not None and int8._session.precision == "int8"
    assert not torch.equal(got, want)  # really the quantised model
    assert float(cosine(got, want).min()) > 0.9
    assert sorted(p.name.split("-")[1] for p in onnx_cache_dir().glob("text-*.onnx")) == ["int8"]


def test_int8_image_model_is_calibrated_and_close_to_fp32() -> None:
    encoder = small_image_encoder("int8")
    reference = small_image_encoder("fp32")
    pixels = torch.stack([encoder.preprocess(im) for im in calibration_images(count=8)])
    with torch.inference_mode():
        got, want = encoder(pixels), reference(pixels)
    assert encoder._session is not None and encoder._session.precision == "int8"
    assert not torch.equal(got, want)
    assert float(cosine(got, want).mean()) > 0.9


def test_int8_never_replaces_training_or_autograd() -> None:
    encoder = small_image_encoder("int8")
    pixels = torch.randn(2, 3, 64, 64)
    encoder.train()
    assert encoder(pixels).requires_grad
    assert encoder._session is None  # no export was needed for it


def test_switching_precision_rebuilds_the_session() -> None:
    encoder = small_image_encoder("fp32")
    configure_cpu_inference(encoder, runtime="onnxruntime")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        encoder(pixels)
        assert encoder._session is not None and encoder._session.precision == "fp32"
        configure_cpu_inference(encoder, precision="int8")
        encoder(pixels)
    assert encoder._session is not None and encoder._session.precision == "int8"
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        configure_cpu_inference(encoder, precision="int4")


def test_default_options_keep_existing_fingerprints() -> None:
    """Feature caches and checkpoints are keyed by the encoder options: the defaults must not change them."""
    assert create_encoders("offline", pretrained=False).options == {
        "max_length": 128,
        "image_runtime": "torch",
    }
    int8 = create_encoders("offline", pretrained=False, precision="int8")
    assert int8.options == {"max_length": 128, "image_runtime": "torch", "precision": "int8"}
    assert int8.image.precision == int8.text.precision == "int8"


def test_serve_precision_setting_and_flag_switch_a_fp32_checkpoint(tmp_path) -> None:
    import argparse

    from core.checkpoint import save_checkpoint
    from stream.commands.serve import add_arguments
    from stream.components import load_predictor
    from stream.settings import load_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--precision", "int8"]).precision == "int8"
    path = tmp_path / "offline.pt"
    save_checkpoint(create_model("offline", ["negative", "neutral", "positive"], dim=32), path)
    model_settings = {"precision": "int8", "text_runtime": "checkpoint", "device": "cpu"}
    predictor = load_predictor(load_settings(flags={"model": model_settings}), path)
    model = predictor.model
    assert model.image_encoder.precision == model.text_encoder.precision == "int8"
    assert model.text_encoder.runtime == "torch"  # the runtime setting is separate; int8 implies ONNX Runtime


def test_tiny_encoders_refuse_int8_clearly() -> None:
    with pytest.raises(ValueError, match="no switchable runtime"):
        configure_cpu_inference(create_encoders("tiny").text, precision="int8")


def test_prepare_onnx_warms_the_cache_for_a_checkpoint(tmp_path) -> None:
    """The build-time step writes the files beside the checkpoint; the second time it finds them."""
    from core.checkpoint import save_checkpoint
    from core.encoders.__main__ import prepare_onnx

    path = tmp_path / "offline.pt"
    save_checkpoint(create_model("offline", ["negative", "neutral", "positive"], dim=32), path)
    files = prepare_onnx(path, "fp32")
    assert [f.name.split("-")[:2] for f in files] == [["image", "fp32"], ["text", "fp32"]]
    assert all(f.is_file() and f.parent == onnx_dir_for(path) for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    assert prepare_onnx(path, "fp32") == files
    assert [f.stat().st_mtime_ns for f in files] == stamps  # found, not exported again


def test_serving_int8_loads_the_built_files_without_torch_encoders(tmp_path) -> None:
    """What ``serve`` does on CPU after the build step: the encoders come from the files beside the checkpoint, with
    no torch copy of their weights (the memory target) and nothing exported, and predict exactly what the torch
    encoders switched to the same int8 files predict."""
    import shutil

    import numpy as np

    from core.checkpoint import load_checkpoint, save_checkpoint
    from core.encoders.__main__ import prepare_onnx
    from core.inference import Predictor

    path = tmp_path / "offline.pt"
    torch.manual_seed(3)
    save_checkpoint(create_model("offline", ["negative", "neutral", "positive"], dim=32), path)
    files = prepare_onnx(path, "int8")
    cached = set(onnx_cache_dir().glob("*.onnx"))
    served = Predictor.from_checkpoint(path, "cpu", precision="int8")
    model = served.model
    for encoder, file in zip((model.image_encoder, model.text_encoder), files, strict=True):
        assert encoder.model is None and not list(encoder.parameters())
        assert encoder._session is not None and encoder._session.path == file
    assert set(onnx_cache_dir().glob("*.onnx")) == cached  # the serving process exported nothing
    with pytest.raises(RuntimeError, match="no torch weights"):
        model.state_dict()

    for file in files:  # the same names in the cache: the switch finds them instead of exporting again
        shutil.copy(file, onnx_cache_dir() / file.name)
    switched = Predictor.from_model(load_checkpoint(path).model)
    for encoder in (switched.model.image_encoder, switched.model.text_encoder):
        configure_cpu_inference(encoder, precision="int8")
    photo = calibration_images(count=1)[0]
    results = [
        p.predict(
            p.prepare([p.preprocess_image(photo), None, p.preprocess_image(photo)], [*TWEETS[:2], None])
        )
        for p in (served, switched)
    ]
    assert results[0].labels == results[1].labels
    np.testing.assert_array_equal(results[0].probabilities, results[1].probabilities)
    np.testing.assert_array_equal(results[0].image_features, results[1].image_features)
