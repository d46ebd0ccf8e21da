"""Train a DRF model on a data set and write its checkpoint (model selection on the dev split only).

Frozen encoders (default): features are encoded once and cached, then the head trains on them, by default in the
product regime (each post intact or under one of its damaged variants, core/training/mixing.py; --regime clean for
the paper's protocol).  --finetune text
fine-tunes the text encoder too (all of it, or its top --finetune-layers layers), the image encoder frozen and its
features cached (core/training/finetune.py): by default in two stages (the text encoder with a linear classifier,
then the DRF head on the fine-tuned features, as above), or end to end with the DRF head (--finetune-objective drf).
--fine-tune trains both encoders (the paper's setting; needs a GPU to be practical).  The state after every epoch
goes to --state; --resume continues an interrupted run from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import save_checkpoint
from core.data import SPEC_HELP, DataFormatError, load_dataset
from core.data.disruption import DISRUPTION_RATIOS, SETTINGS, disrupt_dataset
from core.drf import DEFAULT_QUEUE_SIZE, DEFAULT_VARIANT, VARIANTS
from core.encoders import ENCODER_CONFIGS, LITE_SIZES, EncoderUnavailableError
from core.encoders.__main__ import prepare_cpu_serving
from core.encoders.configs import training_options
from core.evaluation.config import REGIMES
from core.inference import resolve_device
from core.model import ABLATIONS, create_model
from core.provenance import training_record
from core.training import (
    FINETUNE_ENCODER_LR,
    CachedSource,
    FeatureSource,
    SampleSource,
    TrainConfig,
    TrainingError,
    calibrate_temperature,
    encode_samples,
    feature_cache_for,
    finetune_text_encoder,
    finetuned_feature_cache,
    fit,
    one_thread,
    score,
)
from core.training.finetune import FINETUNE_TEXT, OBJECTIVES
from core.training.mixing import PRODUCT_INTACT, damage_mix
from stream.settings import Settings

log = logging.getLogger(__name__)
DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="vader", help=f"data set: {SPEC_HELP} (default: vader)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    parser.add_argument("--encoders", default="offline", choices=ENCODER_CONFIGS)
    parser.add_argument(
        "--dim", type=int, help="DRF width d (default 768; the tiny encoders' width for tiny)"
    )
    parser.add_argument(
        "--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help="queue length L (default 512)"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument(
        "--encoder-lr",
        type=float,
        help=f"encoders' learning rate (default {FINETUNE_ENCODER_LR} with --finetune text, "
        f"{DEFAULTS.encoder_lr} with --fine-tune)",
    )
    parser.add_argument("--head-lr", type=float, default=DEFAULTS.head_lr)
    parser.add_argument("--min-lr", type=float, default=DEFAULTS.min_lr, help="end of the cosine decay")
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    parser.add_argument("--seed", type=int, default=0, help="initialisation, batch order and dropout")
    parser.add_argument("--fine-tune", action="store_true", help="train both encoders too (no feature cache)")
    parser.add_argument(
        "--no-tweets",
        action="store_true",
        help="offline encoders: tokenise texts as they are (default: URLs, mentions, hashtags and emoji rewritten)",
    )
    parser.add_argument(
        "--image-model",
        choices=list(LITE_SIZES),
        help="offline encoders: the EfficientNet-Lite variant (default lite1; lite0 is smaller, lite2 larger)",
    )
    parser.add_argument(
        "--finetune",
        choices=["text"],
        help="text: fine-tune the text encoder, the image encoder frozen (its features cached)",
    )
    parser.add_argument(
        "--finetune-layers",
        type=int,
        metavar="N",
        help="with --finetune text: only the text encoder's top N transformer layers (default: all of it; "
        "0: none; an encoder without layers, tiny, trains whole)",
    )
    parser.add_argument(
        "--finetune-objective",
        choices=OBJECTIVES,
        help="with --finetune text: text (default; two-stage: the text encoder with a linear classifier for "
        "--finetune-epochs, then the DRF head on its cached features, in either regime) or drf (end to end with "
        "the DRF head, the clean regime)",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=FINETUNE_TEXT.epochs,
        help=f"with --finetune text (two-stage): epochs of stage one (default {FINETUNE_TEXT.epochs})",
    )
    parser.add_argument(
        "--modality-random",
        type=float,
        metavar="DR",
        help=f"modality-random training: disrupt a ratio DR of the samples, e.g. {DISRUPTION_RATIOS}",
    )
    parser.add_argument("--setting", default="C+D", choices=SETTINGS, help="disruption setting (default C+D)")
    parser.add_argument(
        "--regime",
        choices=REGIMES,
        help="product (the default for a head on frozen encoders): each training and dev post shown intact or "
        "under one of its damaged variants (the paper's C and D, the realistic damage kinds); clean: the paper's "
        "protocol (the default with --finetune, --fine-tune or --modality-random)",
    )
    parser.add_argument(
        "--product-intact",
        type=float,
        default=PRODUCT_INTACT,
        help=f"product regime: the chance a post is shown intact (default {PRODUCT_INTACT})",
    )
    parser.add_argument("--disruption-seed", type=int, default=0)
    parser.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        choices=list(VARIANTS),
        help="DRF mechanisms: robust (default) or the paper-literal ones (docs/evaluation.md)",
    )
    parser.add_argument(
        "--ablate",
        action="append",
        default=[],
        choices=ABLATIONS,
        help="switch a DRF component off (repeatable; paper Table 4)",
    )
    parser.add_argument("--state", type=Path, help="training state file (default: OUT.state)")
    parser.add_argument("--resume", action="store_true", help="continue from the state file")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/features"), help="feature cache root")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return _train(args, settings)
    except (DataFormatError, EncoderUnavailableError, TrainingError, ValueError) as exc:
        print(f"postsense train: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, settings: Settings) -> int:
    if args.finetune and args.fine_tune:
        raise ValueError(
            "--fine-tune trains both encoders already; --finetune text trains the text encoder only"
        )
    if args.finetune_layers is not None and not args.finetune:
        raise ValueError("--finetune-layers needs --finetune text")
    if args.finetune_objective is not None and not args.finetune:
        raise ValueError("--finetune-objective needs --finetune text")
    end_to_end = bool(args.finetune) and args.finetune_objective == "drf"
    other_regime = bool(end_to_end or args.fine_tune or args.modality_random is not None)
    if args.regime == "product" and other_regime:
        raise ValueError(
            "--regime product trains a head on cached features: not with --fine-tune, --modality-random or "
            "--finetune-objective drf"
        )
    regime = args.regime or ("clean" if other_regime else "product")
    encoder_lr = args.encoder_lr
    if encoder_lr is None:
        encoder_lr = FINETUNE_ENCODER_LR if args.finetune else DEFAULTS.encoder_lr
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        encoder_lr=encoder_lr,
        head_lr=args.head_lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    # Stage one of the two-stage recipe: the text encoder with a linear classifier, at the encoder's learning rate.
    finetune_config = replace(
        FINETUNE_TEXT, encoder_lr=encoder_lr, epochs=args.finetune_epochs, seed=args.seed
    )
    device = resolve_device(settings.model.device)
    progress = not args.no_progress
    dataset = load_dataset(args.data)
    print(dataset.report.summary())
    if args.modality_random is not None:
        dataset, _ = disrupt_dataset(
            dataset, "random", args.setting, args.disruption_seed, dr=args.modality_random
        )
    torch.manual_seed(args.seed)
    ablated: dict[str, Any] = dict.fromkeys(args.ablate, False)
    model = create_model(
        args.encoders,
        dataset.label_names,
        dim=args.dim,
        queue_size=args.queue_size,
        freeze_encoders=not args.fine_tune,
        encoder_options={
            **training_options(args.encoders, not args.no_tweets),
            **({"image_model": args.image_model} if args.image_model else {}),
        },
        variant=args.variant,
        **ablated,
    ).to(device)
    train: FeatureSource
    dev: FeatureSource
    test: FeatureSource
    state = args.state or args.out.with_name(args.out.name + ".state")
    if not args.fine_tune:  # every path but training both encoders reads features from the cache
        cache = feature_cache_for(model, args.cache_dir)
    if args.finetune:
        # The cache of the model as created holds the images (and stays right for them: the image encoder is frozen).
        image_cache = cache
        stage_one = finetune_text_encoder(
            model,
            dataset["train"],
            dataset["dev"],
            config if end_to_end else finetune_config,
            image_cache,
            layers=args.finetune_layers,
            objective=args.finetune_objective or "text",
            state_path=state if end_to_end else state.with_name(state.name + ".text"),
            resume=args.resume,
            progress=progress,
        )
        # Texts encoded by the fine-tuned encoder, cached under its new fingerprint.
        cache = finetuned_feature_cache(model, args.cache_dir, image_cache)
    if end_to_end:
        result = stage_one
        dev, test = (
            CachedSource(encode_samples(model, dataset[s], cache, progress=progress)) for s in ("dev", "test")
        )
    elif args.fine_tune:
        train, dev, test = (SampleSource(model, dataset[s]) for s in ("train", "dev", "test"))
    else:  # a head on cached features: frozen encoders, or stage two after fine-tuning the text encoder
        tables = {
            s: encode_samples(model, dataset[s], cache, progress=progress) for s in ("train", "dev", "test")
        }
        train, dev, test = (CachedSource(tables[s]) for s in ("train", "dev", "test"))
        if regime == "product":
            mixes = {
                s: damage_mix(
                    model,
                    dataset[s],
                    tables[s],
                    cache,
                    args.product_intact,
                    args.seed,
                    args.disruption_seed,
                    progress,
                )
                for s in ("train", "dev")
            }
            train, dev = mixes["train"], CachedSource(mixes["dev"].fixed())
    with nullcontext() if args.fine_tune or end_to_end else one_thread():
        if not end_to_end:
            result = fit(model, train, dev, config, state_path=state, resume=args.resume, progress=progress)
        # Temperature scaling on dev, for the selected weights: saved with the checkpoint, applied by the Predictor.
        temperature = calibrate_temperature(model, dev)
    test_scores = score(model, test, len(dataset.label_names))
    record = training_record(
        args.data,
        {s: dataset[s] for s in ("train", "dev", "test")},
        result.best_dev_accuracy,
        test_scores["accuracy"],
        modality_random=None
        if args.modality_random is None
        else {"dr": args.modality_random, "setting": args.setting, "seed": args.disruption_seed},
        regime=None
        if regime == "clean"
        else {"regime": regime, "intact": args.product_intact, "seed": args.disruption_seed},
    )
    version = save_checkpoint(model, args.out, training=record)
    onnx_files = prepare_cpu_serving(args.out)
    summary = {
        "checkpoint": str(args.out),
        "model_version": version,
        "onnx_files": [str(p) for p in onnx_files],
        "text_finetune": model.text_finetune,
        "best_epoch": result.best_epoch,
        "best_dev_accuracy": round(result.best_dev_accuracy, 2),
        "calibration_temperature": round(temperature, 4),
        "test": {k: round(v, 2) for k, v in test_scores.items()},
        "training": record,
        "history": result.history,
    }
    print(json.dumps(summary, indent=2))
    return 0
