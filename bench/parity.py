"""Accuracy parity of the int8 encoders against fp32 on real posts: the gate for making int8 the CPU default.

Trains the project's default DRF configuration (``core.evaluation.EvalConfig``'s defaults: ``CPU_DIM``,
``CPU_QUEUE_SIZE``, ``CPU_TRAIN``, whatever they are at run time) on fp32 features and on int8 features of the same
posts, for each seed, and compares them on the test split:

* accuracy, fp32 vs int8 (mean over seeds);
* label agreement between the two models on every test post;
* Spearman rho between fp32 and int8 per-modality quality scores (q^v, q^t) over the test posts that have it;

both for a head trained on int8 features ("retrained") and for the fp32 head served with int8 encoders
("fp32 head"), which is what ``model.precision=int8`` does to an existing checkpoint; and, to see which encoder
moves labels, the fp32 head with only the image or only the text features int8.

    python -m bench.parity --data tenfold:../shared/data/mvsa-single-dev/MVSA-single/10-fold-1

``--checkpoint PATH`` instead compares one trained checkpoint (e.g. from ``train --finetune text``, whose text
weights are not the pretrained ones) served at fp32 and at int8 on the test split, through the service's decode,
``Predictor.prepare`` and ``predict``: the same accuracy, agreement and rho, one model, no heads trained.

fp32 features come from the shared cache (``--cache-dir``, default ``data/features``, fingerprinted by the encoders'
weights); int8 features get their own fingerprint. Data, features and per-post outputs stay out of the repository:
only the aggregate figures are written (``bench/results/parity.json``).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import base_parser, print_table, write_result

#: The parity gate: int8 becomes the CPU default only within these.
MAX_ACCURACY_DROP = 0.5  # points
MIN_AGREEMENT = 98.0  # percent of posts
MIN_QUALITY_RHO = 0.95


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on ranks; ties, rare in float scores, are ranked in order)."""
    ranks = [np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def head_outputs(model: Any, table: Any) -> dict[str, np.ndarray]:
    """Predicted labels and log-quality scores of a trained head on a feature table."""
    import torch

    model.train(False)
    with torch.inference_mode():
        out = model.forward_features(table)
    return {
        "labels": out.logits.argmax(-1).numpy(),
        "quality_image": out.log_quality_image.numpy(),
        "quality_text": out.log_quality_text.numpy(),
    }


def compare(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], table: Any) -> dict[str, float]:
    return compare_outputs(
        fp32, int8, table.labels.numpy(), table.image_present.numpy(), table.text_present.numpy()
    )


def compare_outputs(
    fp32: dict[str, np.ndarray],
    int8: dict[str, np.ndarray],
    truth: np.ndarray,
    image: np.ndarray,
    text: np.ndarray,
) -> dict[str, float]:
    """Accuracy of each, label agreement, and Spearman rho of the quality scores over the rows where ``image`` /
    ``text`` (boolean masks) say the modality is there."""
    return {
        "accuracy_fp32": 100.0 * float(np.mean(fp32["labels"] == truth)),
        "accuracy_int8": 100.0 * float(np.mean(int8["labels"] == truth)),
        "agreement": 100.0 * float(np.mean(fp32["labels"] == int8["labels"])),
        "rho_quality_image": spearman(fp32["quality_image"][image], int8["quality_image"][image]),
        "rho_quality_text": spearman(fp32["quality_text"][text], int8["quality_text"][text]),
    }


def passes_gate(accuracy_drop: float, agreement: float, quality_rho: float) -> bool:
    """The gate above, on a mean accuracy drop and the worst agreement and quality rho."""
    return (
        accuracy_drop <= MAX_ACCURACY_DROP and agreement >= MIN_AGREEMENT and quality_rho >= MIN_QUALITY_RHO
    )


def cells(r: dict[str, Any]) -> list[str]:
    """A comparison's table cells: accuracy fp32 and int8, agreement, rho of q^v and q^t."""
    return [
        f"{r['accuracy_fp32']:.2f}",
        f"{r['accuracy_int8']:.2f}",
        f"{r['agreement']:.1f}",
        f"{r['rho_quality_image']:.4f}",
        f"{r['rho_quality_text']:.4f}",
    ]


def verdict(r: dict[str, Any]) -> str:
    return f"accuracy drop {r['accuracy_drop']:+.2f} points, parity {'holds' if r['parity'] else 'FAILS'}"


def served_outputs(checkpoint: Path, samples: list[Any], precision: str) -> dict[str, np.ndarray]:
    """Labels and quality scores of ``checkpoint`` served as ``serve`` serves it on a CPU: both encoders in ONNX
    Runtime at ``precision`` (files built from the checkpoint's own weights), its pinned reference statistics, the
    service's image decode; labels are indices, -1 where it abstained."""
    from PIL import Image

    from connectors.media import MediaLimits, decode_image_bytes
    from core.inference import Predictor

    predictor = Predictor.from_checkpoint(
        checkpoint, device="cpu", image_runtime="onnxruntime", text_runtime="onnxruntime", precision=precision
    )
    limits = MediaLimits(draft_size=(predictor.decode_size, predictor.decode_size))
    labels, quality_image, quality_text = [], [], []
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        pixels = []
        for sample in chunk:
            source, image = sample.image, None
            if isinstance(source, Image.Image):
                image = source
            elif source is not None:
                data = source.read_bytes() if isinstance(source, Path) else source
                image = decode_image_bytes(data, limits).image
            pixels.append(predictor.preprocess_image(image) if image is not None else None)
        prediction = predictor.predict(predictor.prepare(pixels, [sample.text for sample in chunk]))
        labels += [-1 if name is None else predictor.labels.index(name) for name in prediction.labels]
        quality_image.append(prediction.quality_image)
        quality_text.append(prediction.quality_text)
    return {
        "labels": np.array(labels),
        "quality_image": np.concatenate(quality_image),
        "quality_text": np.concatenate(quality_text),
    }


def checkpoint_parity(checkpoint: Path, samples: list[Any]) -> dict[str, float]:
    """int8 against fp32 for one trained checkpoint (e.g. ``train --finetune text``): no head is retrained, which
    is what ``model.precision=int8`` does to it."""
    fp32, int8 = (served_outputs(checkpoint, samples, precision) for precision in ("fp32", "int8"))
    truth = np.array([sample.label for sample in samples])
    image = np.isfinite(fp32["quality_image"]) & np.isfinite(int8["quality_image"])
    text = np.isfinite(fp32["quality_text"]) & np.isfinite(int8["quality_text"])
    result = compare_outputs(fp32, int8, truth, image, text)
    result["accuracy_drop"] = result["accuracy_fp32"] - result["accuracy_int8"]
    result["parity"] = passes_gate(
        result["accuracy_drop"],
        result["agreement"],
        min(result["rho_quality_image"], result["rho_quality_text"]),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data spec, e.g. tenfold:DIR/10-fold-1 (core.data)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/features"), help="feature cache root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--int8-calibration", default=None, help="directory of calibration images (default: the built-in set)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="compare this trained checkpoint served at fp32 and at int8 on the test split (no head is trained)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from core.data import load_dataset
    from core.encoders import Encoders
    from core.evaluation import EvalConfig
    from core.model import DRFModel, create_model
    from core.training import CachedSource, encode_samples, feature_cache_for, fit, one_thread

    config = EvalConfig(data=args.data, seeds=tuple(args.seeds))
    dataset = load_dataset(args.data)
    labels = list(dataset.label_names)
    splits = {"train": dataset["train"], "dev": dataset["dev"], "test": dataset["test"]}
    if args.smoke:
        splits = {name: samples[:48] for name, samples in splits.items()}
    if args.checkpoint is not None:
        started = time.monotonic()
        result = checkpoint_parity(args.checkpoint, splits["test"])
        print_table(
            f"{args.checkpoint.name} served at int8 vs fp32, {dataset.name} test ({len(splits['test'])} posts)",
            ["acc fp32 %", "acc int8 %", "agreement %", "rho q_image", "rho q_text"],
            [cells(result)],
        )
        print(verdict(result))
        document = {
            "data": args.data,
            "test_posts": len(splits["test"]),
            "checkpoint": str(args.checkpoint),
            "result": result,
            "seconds": time.monotonic() - started,
        }
        print(f"wrote {write_result('parity-checkpoint', document, smoke=args.smoke, out_dir=args.out)}")
        return 0
    int8_options = {"precision": "int8"}
    if args.int8_calibration:
        int8_options["int8_calibration"] = args.int8_calibration
    tables, encoders, timings = {}, {}, {}
    for precision, options in (("fp32", {}), ("int8", int8_options)):
        base = create_model(
            config.encoders, labels, dim=config.dim, queue_size=config.queue_size, encoder_options=options
        )
        cache = feature_cache_for(base, args.cache_dir)
        started = time.monotonic()
        tables[precision] = {name: encode_samples(base, samples, cache) for name, samples in splits.items()}
        timings[f"encode_{precision}_seconds"] = time.monotonic() - started
        encoders[precision] = Encoders(
            base.encoder_name, base.image_encoder, base.text_encoder, base.encoder_options
        )
        print(
            f"{precision}: features in {cache.directory} ({timings[f'encode_{precision}_seconds']:.0f} s)",
            flush=True,
        )

    per_seed: list[dict[str, Any]] = []
    for seed in config.seeds:
        trained = {}
        for precision in ("fp32", "int8"):
            torch.manual_seed(seed)
            model = DRFModel(encoders[precision], labels, dim=config.dim, queue_size=config.queue_size)
            with one_thread():
                fit(
                    model,
                    CachedSource(tables[precision]["train"]),
                    CachedSource(tables[precision]["dev"]),
                    config.train_config(seed),
                )
            trained[precision] = model
        test32, test8 = tables["fp32"]["test"], tables["int8"]["test"]
        reference = head_outputs(trained["fp32"], test32)
        # Which encoder moves labels: the fp32 head with one modality's features int8 and the other's fp32.
        image_only = replace(test32, image=test8.image)
        text_only = replace(test32, text=test8.text)
        per_seed.append(
            {
                "seed": seed,
                "retrained": compare(reference, head_outputs(trained["int8"], test8), test32),
                "fp32_head": compare(reference, head_outputs(trained["fp32"], test8), test32),
                "fp32_head_int8_image_only": compare(
                    reference, head_outputs(trained["fp32"], image_only), test32
                ),
                "fp32_head_int8_text_only": compare(
                    reference, head_outputs(trained["fp32"], text_only), test32
                ),
            }
        )

    variants = [k for k in per_seed[0] if k != "seed"]
    summary = {}
    for variant in variants:
        keys = per_seed[0][variant]
        mean = {k: float(np.mean([s[variant][k] for s in per_seed])) for k in keys}
        mean["accuracy_drop"] = mean["accuracy_fp32"] - mean["accuracy_int8"]
        mean["parity"] = passes_gate(
            mean["accuracy_drop"],
            min(s[variant]["agreement"] for s in per_seed),
            min(min(s[variant]["rho_quality_image"], s[variant]["rho_quality_text"]) for s in per_seed),
        )
        summary[variant] = mean
    rows = [
        [
            variant,
            s["seed"],
            *cells(r),
        ]
        for variant in variants
        for s in per_seed
        for r in [s[variant]]
    ] + [
        [
            variant,
            "mean",
            *cells(m),
        ]
        for variant, m in summary.items()
    ]
    print_table(
        f"int8 vs fp32 encoders, {dataset.name} test ({len(splits['test'])} posts), seeds {list(config.seeds)}",
        ["int8 head", "seed", "acc fp32 %", "acc int8 %", "agreement %", "rho q_image", "rho q_text"],
        rows,
    )
    for variant, m in summary.items():
        print(f"{variant}: {verdict(m)}")
    results = {
        "data": args.data,
        "test_posts": len(splits["test"]),
        "seeds": list(config.seeds),
        "config": {"dim": config.dim, "queue_size": config.queue_size, **config.train_config(0).to_dict()},
        "int8_options": int8_options,
        "gate": {
            "max_accuracy_drop": MAX_ACCURACY_DROP,
            "min_agreement": MIN_AGREEMENT,
            "min_quality_rho": MIN_QUALITY_RHO,
        },
        "per_seed": per_seed,
        "summary": summary,
        "timings": timings,
    }
    path = write_result("parity", results, smoke=args.smoke, out_dir=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
