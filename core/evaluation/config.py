"""What an evaluation runs: data set, encoders, seeds, optimisation, disruption settings, methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.data.damage import DAMAGE_CONDITIONS
from core.data.disruption import DISRUPTION_RATIOS, SETTINGS, Setting
from core.drf.head import DEFAULT_VARIANT, MECHANISMS, VARIANTS
from core.evaluation.baselines import BASELINES
from core.model.drf_model import ABLATIONS
from core.training.finetune import FINETUNE_TEXT
from core.training.loop import CPU_DIM, CPU_QUEUE_SIZE, CPU_TRAIN, TrainConfig
from core.training.mixing import PRODUCT_INTACT

ENCODER_DESCRIPTIONS = {
    "offline": "offline: EfficientNet-Lite0 (ImageNet, 1280-d) + all-MiniLM-L6-v2 (384-d), frozen, cached features",
    "paper": "paper: ViT-B/16 + BERT-base (768-d), frozen, cached features",
    "tiny": "tiny: random-init test encoders, frozen, cached features",
}


#: Training regimes (``EvalConfig.regimes``); result rows carry theirs.
REGIMES = ("clean", "product")


@dataclass(frozen=True)
class EvalConfig:
    """What to run; the defaults are the CPU configuration of the full report (see docs/evaluation.md).

    It departs from the paper's section 4.2 to fit a shared 2-core CPU: core.training.CPU_DIM, CPU_QUEUE_SIZE and
    CPU_TRAIN.  Figure 5 has the D and C+D panels by default; C (corrupt only) needs ~6,000 more image encodings
    on this CPU (``random_settings=SETTINGS`` adds it).
    """

    data: str = "vader"
    encoders: str = "offline"
    encoder_options: dict[str, Any] = field(default_factory=dict)
    tweets: bool = True  # offline encoders: tweet normalisation (core.encoders.training_options)
    seeds: tuple[int, ...] = (0, 1, 2)
    dim: int = CPU_DIM
    queue_size: int = CPU_QUEUE_SIZE
    epochs: int = CPU_TRAIN.epochs
    batch_size: int = CPU_TRAIN.batch_size
    encoder_lr: float = CPU_TRAIN.encoder_lr
    head_lr: float = CPU_TRAIN.head_lr
    min_lr: float = CPU_TRAIN.min_lr
    disruption_seed: int = 0
    fixed_settings: tuple[Setting, ...] = SETTINGS
    random_settings: tuple[Setting, ...] = ("D", "C+D")
    ratios: tuple[float, ...] = DISRUPTION_RATIOS
    ablations: tuple[str, ...] = ABLATIONS
    baselines: tuple[str, ...] = BASELINES
    random_methods: tuple[str, ...] = ("drf", "concat")
    variant: str = DEFAULT_VARIANT  # the DRF variant of "drf" and its ablations (core.drf.VARIANTS)
    # Mechanisms of the variant to switch back to the paper's one at a time ("drf-paper-<mechanism>", clean regime).
    mechanisms: tuple[str, ...] = ()
    compare_paper: bool = True  # also run the paper-literal variant ("drf-paper") on the clean regime
    # Realistic damage conditions ("image/truncated", ...; core.data.damage) tested beside the paper's C/D/C+D.
    damage: tuple[str, ...] = ()
    # Cross-validation (core/evaluation/crossval.py): 0 runs the data set's own splits; K >= 2 pools every post and
    # makes each of K stratified folds the test set in turn (folds drawn with ``fold_seed``).
    folds: int = 0
    fold_seed: int = 0
    # Training regimes: "clean" (the paper's protocol: trained clean, tested damaged) and "product" (each training
    # and dev post shown intact with probability ``product_intact``, else under one of its damaged variants, every
    # test condition's but C+D; core/training/mixing.py).  "product" needs cross-validation (folds >= 2).
    regimes: tuple[str, ...] = ("clean",)
    product_intact: float = PRODUCT_INTACT
    # Fine-tuned text encoder (cross-validation only; core.training.finetune's two-stage recipe): per fold, the text
    # encoder (its top ``finetune_layers`` transformer layers; None: all of it) is fine-tuned with a linear text
    # classifier on the fold's clean training posts for ``finetune_epochs`` (dev picks the epoch); every head then
    # trains on its features.  On the folds in ``finetune_e2e_folds`` a DRF model is also fine-tuned end to end (its
    # text encoder with its head, for the heads' ``epochs``), reported as "drf-e2e".
    finetune_text: bool = False
    finetune_layers: int | None = None
    finetune_epochs: int = FINETUNE_TEXT.epochs
    finetune_lr: float = FINETUNE_TEXT.encoder_lr
    finetune_e2e_folds: tuple[int, ...] = (0,)
    # Test conditions whose reliability bins are kept (for the reliability diagram).
    reliability_tests: tuple[str, ...] = ("clean", "image/jpeg_q5", "text/typos")

    def __post_init__(self) -> None:
        problems = []
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and non-empty, got {self.seeds}")
        for name, values, known in (
            ("fixed_settings", self.fixed_settings, SETTINGS),
            ("random_settings", self.random_settings, SETTINGS),
            ("ablations", self.ablations, ABLATIONS),
            ("mechanisms", self.mechanisms, MECHANISMS),
            ("baselines", self.baselines, BASELINES),
            ("random_methods", self.random_methods, ("drf", "drf-paper", *BASELINES)),
        ):
            unknown = [v for v in values if v not in known]
            if unknown:
                problems.append(f"{name}: unknown {unknown}; known: {list(known)}")
        if self.variant not in VARIANTS:
            problems.append(f"variant: unknown {self.variant!r}; known: {list(VARIANTS)}")
        if "router" in (*self.baselines, *self.random_methods) and not {
            "concat",
            "text_only",
            "image_only",
        } <= set(self.baselines):
            problems.append(
                "the router baseline is composed of the concat, text_only and image_only baselines"
            )
        unknown_damage = [d for d in self.damage if d not in DAMAGE_CONDITIONS]
        if unknown_damage:
            problems.append(f"damage: unknown {unknown_damage}; known: {list(DAMAGE_CONDITIONS)}")
        if "gated_router" in (*self.baselines, *self.random_methods) and not {
            "concat",
            "text_only",
            "image_only",
        } <= set(self.baselines):
            problems.append(
                "the gated router is composed of DRF and the concat, text_only and image_only baselines"
            )
        if self.folds == 1 or self.folds < 0:
            problems.append(f"folds must be 0 (the data set's own splits) or at least 2, got {self.folds}")
        if self.folds and (self.random_settings or self.ablations or self.mechanisms):
            problems.append(
                "cross-validation runs the clean-trained regime only: no Figure 5 (random_settings), "
                "ablations or mechanisms (those stay in the published-split report)"
            )
        unknown_regimes = [r for r in self.regimes if r not in REGIMES]
        if unknown_regimes or not self.regimes or "clean" not in self.regimes:
            problems.append(f"regimes: {list(self.regimes)}; known: {list(REGIMES)}, clean always runs")
        if "product" in self.regimes and not self.folds:
            problems.append("the product regime runs in cross-validation only (folds >= 2)")
        if self.finetune_text and not self.folds:
            problems.append("fine-tuning the text encoder is evaluated in cross-validation only (folds >= 2)")
        if self.finetune_text and self.encoders == "paper":
            problems.append(
                "the paper's encoders are not fine-tuned on this CPU; use the offline or tiny encoders"
            )
        if self.finetune_text and any(not 0 <= fold < self.folds for fold in self.finetune_e2e_folds):
            problems.append(f"finetune_e2e_folds must be folds 0 .. folds-1, got {self.finetune_e2e_folds}")
        if self.finetune_layers is not None and (self.finetune_layers < 1 or not self.finetune_text):
            problems.append(
                f"finetune_layers needs finetune_text and must be >= 1, got {self.finetune_layers}"
            )
        if not 0 <= self.product_intact < 1:
            problems.append(f"product_intact must lie in [0, 1), got {self.product_intact}")
        if any(not 0 < r <= 1 for r in self.ratios):
            problems.append(f"ratios must lie in (0, 1], got {self.ratios}")
        if problems:
            raise ValueError("invalid evaluation configuration: " + "; ".join(problems))
        self.train_config(0)  # validates the optimisation settings
        self.finetune_config(0)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            encoder_lr=self.encoder_lr,
            head_lr=self.head_lr,
            min_lr=self.min_lr,
            seed=seed,
        )

    def finetune_config(self, seed: int, epochs: int | None = None) -> TrainConfig:
        """Fine-tuning's optimisation: the text encoder at ``finetune_lr``, the head at the heads' rate, for
        ``epochs`` (default ``finetune_epochs``)."""
        return TrainConfig(
            epochs=epochs or self.finetune_epochs,
            batch_size=FINETUNE_TEXT.batch_size,
            encoder_lr=self.finetune_lr,
            head_lr=self.head_lr,
            min_lr=self.min_lr,
            seed=seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
