"""The paper's maths, torch only: feature queues and quality (``distribution``), the DRF head (``head``) and
what its forward pass produces (``output``)."""

from core.drf.distribution import (
    DEFAULT_QUEUE_SIZE,
    SIGMA_EPS,
    FeatureQueue,
    QueueStats,
    log_quality,
    queue_statistics,
)
from core.drf.head import DEFAULT_VARIANT, MECHANISMS, VARIANTS, DRFConfig, DRFHead
from core.drf.output import DRFOutput

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_VARIANT",
    "MECHANISMS",
    "SIGMA_EPS",
    "VARIANTS",
    "DRFConfig",
    "DRFHead",
    "DRFOutput",
    "FeatureQueue",
    "QueueStats",
    "log_quality",
    "queue_statistics",
]
