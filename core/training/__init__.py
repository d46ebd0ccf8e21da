"""Training: the feature cache and encoding (``features``), the fit loop and scoring (``loop``), fine-tuning the
text encoder (``finetune``), calibration (``calibration``: ECE, NLL, reliability bins, temperature scaling), the demo
model."""

from core.training.calibration import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from core.training.demo_model import ensure_demo_model
from core.training.features import (
    CachedSource,
    FeatureCache,
    SampleSource,
    encode_samples,
    feature_cache_for,
)
from core.training.finetune import (
    FINETUNE_ENCODER_LR,
    TextFinetuneSource,
    enable_text_finetuning,
    finetune_text_encoder,
    finetuned_feature_cache,
)
from core.training.loop import (
    CPU_DIM,
    CPU_QUEUE_SIZE,
    CPU_TRAIN,
    FeatureSource,
    TrainConfig,
    TrainingError,
    TrainResult,
    calibrate_temperature,
    classification_scores,
    fit,
    one_thread,
    predict_logits,
    predict_probabilities,
    score,
)

__all__ = [
    "CPU_DIM",
    "CPU_QUEUE_SIZE",
    "CPU_TRAIN",
    "FINETUNE_ENCODER_LR",
    "CachedSource",
    "FeatureCache",
    "FeatureSource",
    "SampleSource",
    "TextFinetuneSource",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "calibrate_temperature",
    "classification_scores",
    "enable_text_finetuning",
    "encode_samples",
    "ensure_demo_model",
    "expected_calibration_error",
    "feature_cache_for",
    "finetune_text_encoder",
    "finetuned_feature_cache",
    "fit",
    "fit_temperature",
    "negative_log_likelihood",
    "one_thread",
    "predict_logits",
    "predict_probabilities",
    "reliability_bins",
    "score",
]
