"""The service's parts built from settings: the predictor and the shared reference queues.

Shared by ``postsense serve``, ``score`` and ``demo`` and by the Python API (README), so each command
wires the model the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from connectors.reference_queues import QueueMode
from stream.settings import Settings

if TYPE_CHECKING:
    from connectors.metrics import Metrics
    from connectors.reference_queues import ReferenceQueues
    from core.inference import Predictor

log = logging.getLogger(__name__)


def load_predictor(settings: Settings, checkpoint: Path) -> Predictor:
    """The checkpoint's model on ``model.device``, with the configured precision and encoder runtimes."""
    from core.inference import Predictor

    m = settings.model
    chosen = {"image_runtime": m.image_runtime, "text_runtime": m.text_runtime, "precision": m.precision}
    predictor = Predictor.from_checkpoint(
        checkpoint, m.device, m.mixed_precision, **{k: v for k, v in chosen.items() if v != "checkpoint"}
    )
    log.info("encoders: %s", predictor.runtime_summary())
    return predictor


def announce_training(checkpoint: Path) -> None:
    """Say what the checkpoint was trained on, and warn when it is a demo model (``serve`` and ``score`` start)."""
    from core.checkpoint import CheckpointError
    from core.provenance import DEMO_WARNING, describe, is_demo, read_training

    try:
        record = read_training(checkpoint)
    except CheckpointError as exc:  # it loaded a moment ago; a header that fails now is only worth a note
        log.warning("model %s: training data unreadable (%s)", checkpoint, exc)
        return
    log.info("model %s: %s", checkpoint, describe(record))
    if is_demo(record):
        log.warning("model %s: %s", checkpoint, DEMO_WARNING)


def open_reference_queues(settings: Settings, predictor: Predictor, metrics: Metrics) -> ReferenceQueues:
    """The shared Redis reference queues, seeded from the checkpoint when absent (online mode only)."""
    from connectors.reference_queues import ReferenceQueues, checkpoint_reference

    queues = ReferenceQueues(settings.redis, predictor.model_version, metrics)
    if settings.redis.mode is QueueMode.ONLINE:
        contents, capacity = checkpoint_reference(predictor)
        try:
            queues.seed(contents, overwrite=False, capacity=capacity)
        except Exception as exc:  # Redis down at start: serve on the checkpoint's statistics
            log.warning(
                "reference queues not seeded (%s: %s); using the checkpoint's statistics",
                type(exc).__name__,
                exc,
            )
    return queues
