"""Parity of the service's image decode against its previous one on real posts: the gate for a cheaper decode.

Every real post's image is decoded as ``serve`` decodes it (``core.data.images.decode_image``, DCT-scaled to
``Predictor.decode_size``) and preprocessed twice: by the encoder's current ``ImagePreprocessing`` and by the
reference below (Pillow's bicubic ``resize`` of the crop box, which the service ran until 2026-12-03). Both are
encoded by the frozen offline image encoder. The project's default DRF head, trained per seed on the cached
features of the training split, then scores the test posts with either image features:

* label agreement between the two decodes, and accuracy with each;
* Spearman rho of the published image quality q^v between them;
* the input tensors' mean and largest absolute difference (normalised units), over every post of every split.

    python -m bench.decode_parity --data tenfold:../shared/data/mvsa-single-dev/MVSA-single/10-fold-1

Data, features and per-post outputs stay out of the repository: only aggregates go to
``bench/results/decode_parity.json``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import base_parser, print_table, write_result
from bench.parity import compare, head_outputs

#: The gate (issue "what a new user meets"): a cheaper decode is kept only within these.
MIN_AGREEMENT = 99.5  # percent of test posts
MAX_ACCURACY_CHANGE = 0.3  # points, either way
MIN_QUALITY_RHO = 0.99


def reference_preprocess(image: Any, preprocessing: Any) -> Any:
    """The previous preprocessing: Pillow's bicubic resample of the centre-crop box (reducing_gap 3), then
    normalisation; what the current one is measured against."""
    import torch
    from PIL import Image

    image = image.convert("RGB")
    scale = preprocessing.size / preprocessing.crop_pct / min(image.size)
    width = max(preprocessing.size, round(image.width * scale))
    height = max(preprocessing.size, round(image.height * scale))
    left, top = (width - preprocessing.size) // 2, (height - preprocessing.size) // 2
    sx, sy = image.width / width, image.height / height
    box = (left * sx, top * sy, (left + preprocessing.size) * sx, (top + preprocessing.size) * sy)
    size = (preprocessing.size, preprocessing.size)
    pixels = np.asarray(image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0), np.float32)
    mean = np.asarray(preprocessing.mean, np.float32) * 255.0
    std = np.asarray(preprocessing.std, np.float32) * 255.0
    return torch.from_numpy(np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data spec, e.g. tenfold:DIR/10-fold-1 (core.data)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/features"), help="feature cache root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from core.data import load_dataset
    from core.data.damage import image_bytes
    from core.data.images import FORMATS, decode_image
    from core.encoders import Encoders
    from core.evaluation import EvalConfig
    from core.model import DRFModel, create_model
    from core.training import CachedSource, encode_samples, feature_cache_for, fit, one_thread

    config = EvalConfig(data=args.data, seeds=tuple(args.seeds))
    dataset = load_dataset(args.data)
    labels = list(dataset.label_names)
    splits = {name: list(dataset[name]) for name in ("train", "dev", "test")}
    if args.smoke:
        splits = {name: samples[:48] for name, samples in splits.items()}
    base = create_model(config.encoders, labels, dim=config.dim, queue_size=config.queue_size)
    base.eval()
    started = time.monotonic()
    tables = {
        name: encode_samples(base, samples, feature_cache_for(base, args.cache_dir))
        for name, samples in splits.items()
    }
    timings = {"encode_cached_seconds": time.monotonic() - started}

    preprocessing = base.image_encoder.preprocessing
    draft = math.ceil(preprocessing.size / preprocessing.crop_pct)
    differences: list[tuple[float, float]] = []  # (mean, max) |current - reference| per post
    test_pixels: dict[str, list[Any]] = {"current": [], "reference": []}
    test_rows: list[int] = []
    undecodable = 0
    started = time.monotonic()
    for name, samples in splits.items():
        for row, sample in enumerate(samples):
            if sample.image is None:
                continue
            outcome = decode_image(image_bytes(sample.image), 1 << 26, 1 << 28, (draft, draft), FORMATS)
            if outcome.image is None:
                undecodable += 1
                continue
            current = base.image_encoder.preprocess(outcome.image)
            reference = reference_preprocess(outcome.image, preprocessing)
            delta = (current - reference).abs()
            differences.append((float(delta.mean()), float(delta.max())))
            if name == "test" and bool(tables["test"].image_present[row]):
                test_rows.append(row)
                test_pixels["current"].append(current)
                test_pixels["reference"].append(reference)
    timings["decode_seconds"] = time.monotonic() - started

    started = time.monotonic()
    features = {}
    with torch.inference_mode():
        for variant, pixels in test_pixels.items():
            encoded = [base.image_encoder(torch.stack(pixels[i : i + 64])) for i in range(0, len(pixels), 64)]
            image = tables["test"].image.clone()
            image[torch.tensor(test_rows)] = torch.cat(encoded).to(image.dtype)
            features[variant] = replace(tables["test"], image=image)
    timings["encode_test_seconds"] = time.monotonic() - started

    encoders = Encoders(base.encoder_name, base.image_encoder, base.text_encoder, base.encoder_options)
    per_seed = []
    for seed in config.seeds:
        torch.manual_seed(seed)
        model = DRFModel(encoders, labels, dim=config.dim, queue_size=config.queue_size)
        with one_thread():
            fit(model, CachedSource(tables["train"]), CachedSource(tables["dev"]), config.train_config(seed))
        reference = head_outputs(model, features["reference"])
        per_seed.append(
            {"seed": seed, **compare(reference, head_outputs(model, features["current"]), tables["test"])}
        )

    mean = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0] if k != "seed"}
    # compare() names its two sides fp32/int8 (bench.parity): here they are the reference and current decode.
    summary = {
        "accuracy_reference": mean["accuracy_fp32"],
        "accuracy_current": mean["accuracy_int8"],
        "accuracy_change": mean["accuracy_int8"] - mean["accuracy_fp32"],
        "agreement_min": min(s["agreement"] for s in per_seed),
        "rho_quality_image_min": min(s["rho_quality_image"] for s in per_seed),
        "input_mean_abs_difference": float(np.mean([d[0] for d in differences])),
        "input_max_abs_difference": float(np.max([d[1] for d in differences])),
        "posts_compared": len(differences),
        "test_posts_compared": len(test_rows),
        "undecodable": undecodable,
    }
    summary["parity"] = bool(
        summary["agreement_min"] >= MIN_AGREEMENT
        and abs(summary["accuracy_change"]) <= MAX_ACCURACY_CHANGE
        and summary["rho_quality_image_min"] >= MIN_QUALITY_RHO
    )
    print_table(
        f"current decode vs reference, {dataset.name}: {len(test_rows)} test posts with an image, seeds "
        f"{list(config.seeds)}",
        ["seed", "acc reference %", "acc current %", "agreement %", "rho q_image"],
        [
            [
                s["seed"],
                f"{s['accuracy_fp32']:.2f}",
                f"{s['accuracy_int8']:.2f}",
                f"{s['agreement']:.1f}",
                f"{s['rho_quality_image']:.4f}",
            ]
            for s in per_seed
        ],
    )
    print(
        f"inputs over {len(differences)} posts: mean |diff| {summary['input_mean_abs_difference']:.4f}, max "
        f"{summary['input_max_abs_difference']:.3f}; accuracy change {summary['accuracy_change']:+.2f} points; "
        f"parity {'holds' if summary['parity'] else 'FAILS'}"
    )
    results = {
        "data": args.data,
        "seeds": list(config.seeds),
        "draft_size": draft,
        "gate": {
            "min_agreement": MIN_AGREEMENT,
            "max_accuracy_change": MAX_ACCURACY_CHANGE,
            "min_quality_rho": MIN_QUALITY_RHO,
        },
        "per_seed": per_seed,
        "summary": summary,
        "timings": timings,
    }
    path = write_result("decode_parity", results, smoke=args.smoke, out_dir=args.out)
    print(f"wrote {path}")
    return 0 if summary["parity"] or args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
