"""Training: the feature cache and encoding (``features``), the fit loop and scoring (``loop``), the demo model."""

from core.training.demo_model import ensure_demo_model
from core.training.features import (
    CachedSource,
    FeatureCache,
    SampleSource,
    encode_samples,
    feature_cache_for,
)
from core.training.loop import (
    CPU_DIM,
    CPU_QUEUE_SIZE,
    CPU_TRAIN,
    FeatureSource,
    TrainConfig,
    TrainingError,
    TrainResult,
    classification_scores,
    fit,
    one_thread,
    predict_probabilities,
    score,
)

__all__ = [
    "CPU_DIM",
    "CPU_QUEUE_SIZE",
    "CPU_TRAIN",
    "CachedSource",
    "FeatureCache",
    "FeatureSource",
    "SampleSource",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "classification_scores",
    "encode_samples",
    "ensure_demo_model",
    "feature_cache_for",
    "fit",
    "one_thread",
    "predict_probabilities",
    "score",
]
