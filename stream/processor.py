"""What is computed on a batch: input records → sentiment records and dead letters (no Kafka here).

The consumer loop (``stream.runtime``) decides *how* batches are fed, published and committed; this
module only turns records into output records, so it can be tested and benchmarked without a broker.
Per record: validate against the post contract (``parse_post``); decode the image under the media
policy and normalise the text (in worker threads: Pillow and the tokenizer release the GIL); then one
forward pass per batch (``infer``). A missing, empty or undecodable modality is a state with a reason (λ = 0 in
the paper's eq. (12)), never an error; only a record that is not a post becomes a dead letter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from connectors.media import DecodedImage, MediaLimits, decode_image_field
from connectors.metrics import Metrics
from core.contracts import (
    DeadLetter,
    Invalid,
    Limits,
    ModalityReport,
    ModalityState,
    Post,
    dumps_strict,
    parse_post,
    sentiment_document,
    utc_now_iso,
)
from stream.settings import Settings

if TYPE_CHECKING:
    import torch

    from core.inference import BatchPrediction, Predictor, PreparedBatch


log = logging.getLogger(__name__)


class ReferenceQueuesLike(Protocol):
    """The two calls the processor makes on ``connectors.reference_queues.ReferenceQueues``."""

    def stats(self) -> dict[str, Any] | None: ...

    def propose(
        self, features: dict[str, Any], accepted: dict[str, Any], present: dict[str, Any]
    ) -> None: ...


@dataclass(frozen=True)
class Record:
    """One consumed input record: where it came from, and its untouched key and value."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class OutgoingRecord:
    """One record to publish (a sentiment record or a dead letter)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass
class DecodedPost:
    """A valid post with both modalities ready for ``Predictor.prepare``, and their states."""

    record: Record
    post: Post
    image: DecodedImage
    pixels: torch.Tensor | None  # the encoder's preprocessed image when image.state is ok
    text: str | None  # normalised text; None when missing or empty
    text_state: ModalityState
    text_reason: str | None


@dataclass
class BatchResult:
    """The output of one batch: sentiment documents (for the output hook) and every record to publish."""

    documents: list[dict[str, Any]]
    records: list[OutgoingRecord]
    dead_letter_reasons: list[str]
    created_at: list[str | None]


def validate(record: Record, limits: Limits) -> Post | Invalid:
    """The record's post, or why it is not one (cheap: JSON parse and schema check, no decoding)."""
    return parse_post(record.value, limits)


#: What a dead letter keeps of a key or value past ``limits.max_record_bytes``.
OVERSIZED_PREFIX_BYTES = 64 * 1024


def dead_letter(record: Record, invalid: Invalid, topic: str, max_record_bytes: int) -> OutgoingRecord:
    """The dead-letter record: original key and value untouched, the reason in headers.

    Except past ``max_record_bytes``: the producer (sized for accepted records) could never send such a
    letter, and retrying it would stall the partition for good, so only a prefix is kept; the detail says
    so and the source coordinates locate the original.
    """
    key, value, detail = record.key, record.value, invalid.detail
    if (len(key or b"") + len(value or b"")) > max_record_bytes:
        key = None if key is None else key[:OVERSIZED_PREFIX_BYTES]
        value = None if value is None else value[:OVERSIZED_PREFIX_BYTES]
        detail = f"{detail}; key and value cut to their first {OVERSIZED_PREFIX_BYTES} bytes"
    log.info(
        "dead letter %s from %s-%d@%d: %s",
        invalid.reason,
        record.topic,
        record.partition,
        record.offset,
        detail,
        extra={
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "reason": invalid.reason,
            "error_class": invalid.error_class,
            "post_id": _key_text(record.key),
        },
    )
    letter = DeadLetter(
        key=key,
        value=value,
        reason=invalid.reason,
        error_class=invalid.error_class,
        detail=detail,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp_ms,
    )
    return OutgoingRecord(topic=topic, key=key, value=value, headers=letter.headers())


def torch_threads(threads: int | None = None) -> int:
    """The calling thread's torch (OpenMP) thread count, fixed for this thread from now on (set to ``threads``
    if given; torch's default for threads that start later becomes that count too). Take it before
    ``decode_pool`` changes that default, give it to the thread that runs the model, and give it back to the
    caller once the pool is shut down."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def decode_pool(workers: int) -> ThreadPoolExecutor:
    """The threads that run ``BatchProcessor.decode``, each running torch on one thread.

    A photo's preprocessing is a few small tensor ops. With torch's default, each decode thread led its own OpenMP
    team as wide as the machine, whose threads spun between those ops on the cores the model needs: one thread
    preprocessing bench photos on 2 idle cores used 2.0 ms of CPU per photo instead of 1.0 (5.3 instead of 1.3 with
    the other core busy). ``torch.set_num_threads`` sets the
    calling thread's OpenMP and MKL counts, and the default of threads that start later: a thread that runs the
    model sets its own (``torch_threads``)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="decode", initializer=torch_threads, initargs=(1,))


def _key_text(key: bytes | None) -> str | None:
    """The record key as the post id it should be (for logs); None when absent or not UTF-8."""
    try:
        return None if key is None else key[:256].decode("utf-8")
    except UnicodeDecodeError:
        return None


class BatchProcessor:
    """Decodes posts and runs the DRF model on a batch; builds the output contract's records."""

    def __init__(
        self,
        settings: Settings,
        predictor: Predictor,
        metrics: Metrics,
        queues: ReferenceQueuesLike | None = None,
    ) -> None:
        self.predictor = predictor
        self.metrics = metrics
        self.queues = queues
        self._stats_in_use: dict[str, Any] | None = None
        self.output_topic = settings.kafka.output_topic
        self.dead_letter_topic = settings.kafka.dead_letter_topic
        self.limits = settings.limits
        # JPEGs decode DCT-scaled to the model's own input size, not larger: fewer pixels to decode and resize.
        self.media_limits = MediaLimits(
            max_image_bytes=settings.limits.max_image_bytes,
            max_image_pixels=settings.limits.max_image_pixels,
            draft_size=(predictor.decode_size, predictor.decode_size),
        )
        self.fetch_policy = settings.media.policy()
        # A fast (Rust) tokenizer raises "Already borrowed" when two threads use it at once.
        self._prepare_lock = threading.Lock()

    def decode(self, record: Record, post: Post) -> DecodedPost:
        """Decode one post's modalities (thread-safe; runs in the decode pool). Never raises for bad input."""
        image = decode_image_field(post.image, self.media_limits, self.fetch_policy)
        pixels = self.predictor.preprocess_image(image.image) if image.image is not None else None
        image.image = None  # the pixels are all inference needs; free the decoded bitmap early
        if post.text is None:
            text, text_state, text_reason = None, ModalityState.missing, None
        else:
            text = self.predictor.normalise_text(post.text)
            text_state, text_reason = (
                (ModalityState.ok, None) if text else (ModalityState.empty, "blank_text")
            )
        return DecodedPost(record, post, image, pixels, text, text_state, text_reason)

    def prepare(self, posts: Sequence[DecodedPost]) -> PreparedBatch:
        """The batch's model input: images stacked, texts tokenised. Thread-safe, so ``serve`` runs it in the
        decode pool and its model thread runs only the forward."""
        with self._prepare_lock:
            return self.predictor.prepare([p.pixels for p in posts], [p.text for p in posts])

    def infer(self, posts: Sequence[DecodedPost], prepared: PreparedBatch | None = None) -> BatchPrediction:
        """One forward pass for the batch (``prepared``: its ``prepare``, done beforehand), against the freshest
        reference statistics."""
        if self.queues is not None:
            stats = self.queues.stats()  # cached, never a Redis round trip; a new dict only when it changed
            if stats is not None and stats is not self._stats_in_use:
                self.predictor.set_reference_stats(stats)
                self._stats_in_use = stats
        if prepared is None:
            prepared = self.prepare(posts)
        started = time.perf_counter()
        prediction = self.predictor.predict(prepared)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        # The one Redis round trip per batch: propose what the admission rule accepted.
        if self.queues is not None:
            self.queues.propose(
                {"image": prediction.image_features, "text": prediction.text_features},
                {"image": prediction.image_accepted, "text": prediction.text_accepted},
                {"image": prepared.image_present.numpy(), "text": prepared.text_present.numpy()},
            )
        return prediction

    def process(
        self,
        posts: Sequence[DecodedPost],
        invalid: Sequence[tuple[Record, Invalid]],
        prepared: PreparedBatch | None = None,
    ) -> BatchResult:
        """Sentiment records for the decoded posts (``prepared``: their ``prepare``, if done beforehand) and dead
        letters for the invalid records."""
        documents: list[dict[str, Any]] = []
        if posts:
            prediction = self.infer(posts, prepared)
            self.metrics.observe_prediction(prediction)
            self.metrics.observe_modality_states("image", [p.image.state for p in posts])
            self.metrics.observe_modality_states("text", [p.text_state for p in posts])
            truncated = sum(p.post.text_truncated for p in posts)
            if truncated:
                self.metrics.text_truncated_total.inc(truncated)
            processed_at = utc_now_iso()
            documents = [self.document(p, prediction, i, processed_at) for i, p in enumerate(posts)]
        records = [
            OutgoingRecord(self.output_topic, p.post.id.encode(), dumps_strict(doc).encode(), [])
            for p, doc in zip(posts, documents, strict=True)
        ]
        records += [
            dead_letter(record, why, self.dead_letter_topic, self.limits.max_record_bytes)
            for record, why in invalid
        ]
        return BatchResult(
            documents=documents,
            records=records,
            dead_letter_reasons=[why.reason for _, why in invalid],
            created_at=[p.post.created_at for p in posts],
        )

    def document(
        self, post: DecodedPost, prediction: BatchPrediction, row: int, processed_at: str
    ) -> dict[str, Any]:
        """Row ``row`` of the batch's prediction as the post's sentiment record (built by the contract)."""
        probabilities = None
        if not prediction.abstained[row]:
            probabilities = {
                name: float(p)
                for name, p in zip(self.predictor.labels, prediction.probabilities[row], strict=True)
            }
        return sentiment_document(
            post.post,
            source=(post.record.topic, post.record.partition, post.record.offset),
            label=prediction.labels[row],
            probabilities=probabilities,
            image=ModalityReport(post.image.state, post.image.reason, float(prediction.quality_image[row])),
            text=ModalityReport(post.text_state, post.text_reason, float(prediction.quality_text[row])),
            recovered=prediction.recovered[row],
            fusion_weights=prediction.fusion_weights[row],
            model=(self.predictor.model_name, self.predictor.model_version),
            processed_at=processed_at,
            calibration=self.predictor.calibration,
        )
