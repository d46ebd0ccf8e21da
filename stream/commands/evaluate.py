"""Reproduce the paper's evaluation (Tables 1, 3, 4 and Figure 5) with baselines, as Markdown, JSON and PNG.

Without --full: one seed, Tables 1 and 3 with the baselines (a quick look).  With --full: three seeds, the
ablations of Table 4 and the modality-random curves of Figure 5.  With --folds K: K-fold cross-validation over
every post (seeds 0 and 1, every realistic damage condition, both training regimes, no ablations, Figure 5 or
paper-literal DRF; fold and regime in every result row).  Any option below overrides these.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from core.data import SPEC_HELP, DataFormatError
from core.data.damage import DAMAGE_CONDITIONS
from core.data.disruption import SETTINGS
from core.drf import MECHANISMS, VARIANTS
from core.encoders import ENCODER_CONFIGS, LITE_SIZES, EncoderUnavailableError
from core.evaluation import EvalConfig, run_evaluation
from core.evaluation.config import REGIMES
from core.model import ABLATIONS
from stream.settings import Settings

QUICK = {"seeds": (0,), "random_settings": (), "ablations": ()}
CROSSVAL = {
    "seeds": (0, 1),
    "random_settings": (),
    "ablations": (),
    "compare_paper": False,
    "damage": DAMAGE_CONDITIONS,
    "regimes": REGIMES,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="vader", help=f"data set: {SPEC_HELP} (default: vader)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for report.md, results.json, figure5.png (reliability.png with --folds)",
    )
    parser.add_argument(
        "--full", action="store_true", help="3 seeds, ablations and Figure 5 (the full report)"
    )
    parser.add_argument("--encoders", choices=ENCODER_CONFIGS)
    parser.add_argument(
        "--no-tweets",
        dest="tweets",
        action="store_false",
        default=None,
        help="offline encoders: tokenise texts as they are (default: URLs, mentions, hashtags and emoji rewritten)",
    )
    parser.add_argument(
        "--image-model",
        choices=list(LITE_SIZES),
        help="offline encoders: the EfficientNet-Lite variant (default lite1; lite0 is smaller, lite2 larger)",
    )
    parser.add_argument(
        "--variant", choices=list(VARIANTS), help="the DRF mechanisms of 'drf' (default: robust)"
    )
    parser.add_argument(
        "--mechanisms",
        nargs="*",
        choices=MECHANISMS,
        help="also train DRF with each of these switched back to the paper's, one at a time",
    )
    parser.add_argument(
        "--folds",
        type=int,
        help="K-fold cross-validation over every post (K >= 2): report.md, results.json, reliability.png",
    )
    parser.add_argument("--fold-seed", type=int, help="seed of the folds (default 0)")
    parser.add_argument(
        "--damage",
        nargs="*",
        choices=DAMAGE_CONDITIONS,
        help="realistic damage conditions to test (default with --folds: all; none: skip)",
    )
    parser.add_argument(
        "--regimes",
        nargs="+",
        choices=REGIMES,
        help="training regimes with --folds (default: both): clean (the paper's) and product (trained on damaged "
        "posts too)",
    )
    parser.add_argument(
        "--product-intact", type=float, help="product regime: chance a training post is shown intact (0.5)"
    )
    parser.add_argument(
        "--finetune",
        choices=["text"],
        help="with --folds: fine-tune the text encoder per fold on its training posts (two-stage: a linear text "
        "classifier, then every head trains on its features; DRF fine-tuned end to end is reported as drf-e2e)",
    )
    parser.add_argument(
        "--finetune-layers",
        type=int,
        help="with --finetune text: only the top N transformer layers (default: all of it)",
    )
    parser.add_argument("--finetune-epochs", type=int, help="with --finetune text: epochs of stage one (3)")
    parser.add_argument(
        "--finetune-e2e-folds",
        type=int,
        nargs="*",
        help="with --finetune text: folds on which DRF is also fine-tuned end to end (default: 0; none: skip)",
    )
    parser.add_argument(
        "--finetune-lr", type=float, help="with --finetune text: the text encoder's learning rate (3e-5)"
    )
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--dim", type=int, help="DRF width d of every head (default 128)")
    parser.add_argument("--queue-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--head-lr", type=float)
    parser.add_argument("--disruption-seed", type=int)
    parser.add_argument("--fixed-settings", nargs="+", choices=SETTINGS)
    parser.add_argument(
        "--random-settings", nargs="*", choices=SETTINGS, help="Figure 5 panels (none: skip it)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", help="Figure 5 disruption ratios dr")
    parser.add_argument("--ablations", nargs="*", choices=ABLATIONS, help="Table 4 rows (none: skip it)")
    parser.add_argument(
        "--baselines", nargs="*", help="concat, concat_dropout, text_only, image_only, router (none: skip)"
    )
    parser.add_argument("--random-methods", nargs="+", help="methods in Figure 5 (default: drf concat)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/features"), help="feature cache root")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    values: dict[str, Any] = dict(CROSSVAL) if args.folds else {} if args.full else dict(QUICK)
    for f in fields(EvalConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(given, list) else given
    if args.finetune:
        values["finetune_text"] = args.finetune == "text"
    if args.image_model:
        values["encoder_options"] = {"image_model": args.image_model}
    return EvalConfig(**values)


def run(args: argparse.Namespace, settings: Settings) -> int:
    del settings  # evaluation runs on the CPU features cache; no service settings apply
    try:
        paths = run_evaluation(
            config_from_args(args), args.out, args.cache_dir, progress=not args.no_progress
        )
    except (DataFormatError, EncoderUnavailableError, ValueError) as exc:
        print(f"postsense evaluate: {exc}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
