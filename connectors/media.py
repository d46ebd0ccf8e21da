"""Turning a post's `image` field into RGB pixels, or into a modality state with a reason.

The runtime calls `decode_image_field` from a thread pool (Pillow releases the GIL while decoding),
so this module keeps no mutable global state (Pillow's global MAX_IMAGE_PIXELS is left alone; the
pixel limit is per call) and never raises for bad input: a hostile or broken image only makes the
image modality `undecodable`, and the post is still scored on its text.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from PIL import Image

from connectors.fetch import FetchError, FetchPolicy, fetch_url, read_local_file
from core.contracts import DEFAULT_LIMITS, ModalityState
from core.data.images import DRAFT_SIZE, FORMATS, decode_image

__all__ = [
    "DecodedImage",
    "FetchPolicy",
    "ModalityState",
    "MediaLimits",
    "decode_image_bytes",
    "decode_image_field",
]

_DATA_URI_PREFIX = re.compile(r"^data:[\w.+/-]*(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class MediaLimits:
    """Per-call bounds on what one post's image may cost.

    draft_size: JPEGs are decoded by libjpeg at the smallest 1/2, 1/4 or 1/8 scale that is still at
    least this size (a 4000x3000 photo decodes at 1000x750); the service sets it to the model's own input
    size (``Predictor.decode_size``), since the image encoder resizes to that anyway. formats: the Pillow decoders allowed; a short list keeps rarely-audited parsers (and
    EPS, which runs Ghostscript) away from untrusted bytes.
    """

    max_image_bytes: int = DEFAULT_LIMITS.max_image_bytes
    max_image_pixels: int = DEFAULT_LIMITS.max_image_pixels
    draft_size: tuple[int, int] = DRAFT_SIZE
    formats: tuple[str, ...] = FORMATS

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("MediaLimits: max_image_bytes and max_image_pixels must be > 0")
        if len(self.draft_size) != 2 or min(self.draft_size) <= 0:
            raise ValueError(f"MediaLimits.draft_size must be two positive ints, got {self.draft_size!r}")
        Image.init()  # registers every plugin once, here, rather than lazily inside worker threads
        formats = tuple(f.upper() for f in self.formats)
        unknown = [f for f in formats if f not in Image.OPEN]
        if not formats or unknown:
            raise ValueError(
                f"MediaLimits.formats: unknown Pillow formats {unknown} (known: {sorted(Image.OPEN)})"
            )
        object.__setattr__(self, "formats", formats)


@dataclass
class DecodedImage:
    """An image field's outcome: pixels when `state` is ok, else a machine `reason` (e.g. "too_large")."""

    state: ModalityState
    reason: str | None
    image: Image.Image | None
    nbytes: int


def _failed(reason: str, nbytes: int) -> DecodedImage:
    return DecodedImage(ModalityState.undecodable, reason, None, nbytes)


def decode_image_bytes(data: bytes, limits: MediaLimits) -> DecodedImage:
    """Decode raw image bytes (first frame, EXIF orientation applied) under `limits`: core.data.images.decode_image,
    the one decode the evaluation's damaged images go through too."""
    outcome = decode_image(
        data, limits.max_image_bytes, limits.max_image_pixels, limits.draft_size, limits.formats
    )
    return DecodedImage(outcome.state, outcome.reason, outcome.image, len(data))


def _decode_base64(text: str, limits: MediaLimits) -> bytes | DecodedImage:
    """Standard or URL-safe base64, optionally as a data: URI and wrapped over lines (MIME style).

    Strict standard base64, what nearly every producer sends, is decoded by one C call; anything else takes the
    lenient path, whose whitespace scan alone cost about 4x the decode on a 58 KB bench photo."""
    if text and len(text) // 4 * 3 <= limits.max_image_bytes + 3:
        try:
            return binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):  # ValueError: a non-ASCII character
            pass
    body = _WHITESPACE.sub("", _DATA_URI_PREFIX.sub("", text, count=1))
    if not body:
        return DecodedImage(ModalityState.empty, "empty_value", None, 0)
    if len(body) // 4 * 3 > limits.max_image_bytes + 3:  # refuse before materialising the bytes
        return _failed("too_large", len(body) // 4 * 3)
    altchars = b"-_" if ("-" in body or "_" in body) else None
    unpadded = body.rstrip("=")  # padding is often dropped or wrong; the data length decides
    try:
        return base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return _failed("base64_invalid", 0)


def decode_image_field(field: object, limits: MediaLimits, policy: FetchPolicy) -> DecodedImage:
    """A post's `image` field -> DecodedImage. Never raises for any JSON value.

    None -> missing; `{"base64": s}`, `{"url": s}` or `{"path": s}` (exactly one key, a string)
    -> decoded pixels or undecodable with a reason; an empty string or zero bytes -> empty.
    """
    if field is None:
        return DecodedImage(ModalityState.missing, None, None, 0)
    if not isinstance(field, dict):
        return _failed("field_not_object", 0)
    if len(field) != 1:
        return _failed("field_bad_keys", 0)
    ((kind, value),) = field.items()
    if kind not in ("base64", "url", "path"):
        return _failed("field_bad_keys", 0)
    if not isinstance(value, str):
        return _failed("field_value_not_string", 0)
    if not value.strip():
        return DecodedImage(ModalityState.empty, "empty_value", None, 0)
    data: bytes | DecodedImage
    if kind == "base64":
        data = _decode_base64(value, limits)
    else:
        try:
            if kind == "url":
                data = fetch_url(value, policy, limits.max_image_bytes)
            else:
                data = read_local_file(value, policy, limits.max_image_bytes)
        except FetchError as exc:
            return _failed(exc.reason, 0)
    return data if isinstance(data, DecodedImage) else decode_image_bytes(data, limits)
