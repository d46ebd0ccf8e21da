"""Score posts from the input topic as a member of the consumer group; publish sentiment and dead letters.

Run any number of these with the same group id: they share the input topic's partitions. SIGTERM or
SIGINT finishes the batches in hand, publishes and commits them, leaves the group and exits 0.
Exit codes: 0 stopped cleanly, 1 a batch could not be processed or published, 2 bad settings,
3 the dead-letter circuit breaker stopped consumption.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from types import FrameType

from kafka.errors import KafkaError

from stream import __version__
from stream.breaker import CircuitBreakerOpen
from stream.publisher import PublishError
from stream.runtime import Service, ServiceError
from stream.settings import Settings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_SETTINGS, EXIT_BREAKER = 0, 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-reference-queues",
        action="store_true",
        help="score quality against the checkpoint's own queues and never contact Redis",
    )
    parser.add_argument(
        "--create-topics",
        type=int,
        metavar="PARTITIONS",
        help="create the input, output and dead-letter topics with this many partitions if they do not exist",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        help="CPU encoder precision, overriding model.precision (int8: ONNX Runtime int8 encoders; GPUs ignore it)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    checkpoint = settings.model.checkpoint
    if checkpoint is None:
        log.error("no model: set model.checkpoint (--checkpoint PATH or POSTSENSE_MODEL__CHECKPOINT)")
        return EXIT_SETTINGS
    from connectors.metrics import Metrics
    from connectors.metrics_server import MetricsServer
    from core.checkpoint import CheckpointError
    from stream.components import announce_training, load_predictor, open_reference_queues

    if args.precision:
        settings = settings.model_copy(
            update={"model": settings.model.model_copy(update={"precision": args.precision})}
        )
    try:
        predictor = load_predictor(settings, checkpoint)
    except (CheckpointError, OSError, ValueError) as exc:
        log.error("cannot load the model: %s", exc)
        return EXIT_SETTINGS
    log.info("model %s %s on %s", predictor.model_name, predictor.model_version, predictor.device)
    announce_training(checkpoint)
    if args.create_topics:
        from connectors.kafka import ensure_topics

        k = settings.kafka
        ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=args.create_topics)

    metrics = Metrics()
    metrics.set_build_info(__version__, predictor.model_name, predictor.model_version, str(predictor.device))
    queues = None if args.no_reference_queues else open_reference_queues(settings, predictor, metrics)
    service = Service(settings, predictor, metrics=metrics, queues=queues)

    def alive() -> bool:  # the loop polls at least every few hundred ms, even while paused
        return time.monotonic() - service.last_poll < settings.kafka.max_poll_interval_ms / 1000

    server = MetricsServer(
        metrics, settings.metrics.host, settings.metrics.port, ready=service.ready, alive=alive
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: finishing the batches in hand, then exiting", signal.Signals(signum).name)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.run()
    except CircuitBreakerOpen:
        return EXIT_BREAKER  # already logged with its reason by the loop
    except (ServiceError, PublishError) as exc:
        log.error("stopped: %s", exc)
        return EXIT_FAILED
    except KafkaError as exc:  # e.g. no broker answered within the bootstrap timeout
        log.error("Kafka: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILED
    finally:
        server.close()
        if queues is not None:
            queues.close()
    return EXIT_OK
