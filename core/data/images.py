"""The one decode of untrusted image bytes into RGB pixels, shared by the service and the evaluation.

``decode_image(data, ...)`` is what ``postsense serve`` and ``score`` run on every post's image (through
``connectors.media.decode_image_bytes``, which passes its ``MediaLimits`` here as plain arguments) and what the
evaluation's realistic damage (core/data/damage.py) runs on a truncated JPEG, so a damaged image is scored exactly as
the service would see it.  Pillow only; it never raises for bad input: a broken image is a state and a reason.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from core.contracts import ModalityState

#: The service's defaults (``connectors.media.MediaLimits``): JPEG draft size and the Pillow decoders allowed.
DRAFT_SIZE: tuple[int, int] = (448, 448)
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP")

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageOutcome:
    """Pixels when ``state`` is ok, else the modality state and a machine ``reason`` (e.g. "truncated")."""

    state: ModalityState
    reason: str | None
    image: Image.Image | None


def _failed(reason: str) -> ImageOutcome:
    return ImageOutcome(ModalityState.undecodable, reason, None)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB whatever the source mode; transparency is composited on white, not dropped to black."""
    if im.mode in _SIXTEEN_BIT_MODES:
        # convert("L") clips 16-bit values at 255 instead of scaling, which turns most photos white.
        im = im.point(lambda v: v * (1 / 256)).convert("L")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))  # ~2.5x faster than alpha_composite
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def _classify_decode_error(exc: Exception) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError):
        return "truncated"
    return "decode_error"


def decode_image(
    data: bytes,
    max_image_bytes: int,
    max_image_pixels: int,
    draft_size: tuple[int, int],
    formats: Sequence[str],
) -> ImageOutcome:
    """Decode raw image bytes (first frame, EXIF orientation applied) under the given limits.

    JPEGs decode at the smallest DCT scale still at least ``draft_size``; ``formats`` are the Pillow decoders
    allowed; the pixel count is checked from the header, before anything is allocated.  Zero bytes are the
    ``empty`` state; everything else that fails is ``undecodable`` with a reason (a truncated file: "truncated").
    """
    nbytes = len(data)
    if nbytes == 0:
        return ImageOutcome(ModalityState.empty, "zero_bytes", None)
    if nbytes > max_image_bytes:
        return _failed("too_large")
    try:
        im = Image.open(io.BytesIO(data), formats=tuple(formats))
    except UnidentifiedImageError:
        return _failed("not_an_image")
    except Image.DecompressionBombError:  # Pillow's process-wide ceiling (2 x Image.MAX_IMAGE_PIXELS)
        return _failed("too_many_pixels")
    except Exception as exc:  # a corrupt header can raise almost anything from a plugin
        return _failed(_classify_decode_error(exc))
    width, height = im.size
    if width <= 0 or height <= 0:
        return _failed("zero_size")
    if width * height > max_image_pixels:  # checked before load(): nothing allocated yet
        return _failed("too_many_pixels")
    try:
        im.draft("RGB", draft_size)  # no-op for non-JPEG formats
        im.load()  # the first frame of an animation
        with contextlib.suppress(Exception):  # malformed EXIF: the pixels are still good, keep them unrotated
            ImageOps.exif_transpose(im, in_place=True)
        rgb = to_rgb(im)
    except Exception as exc:
        return _failed(_classify_decode_error(exc))
    return ImageOutcome(ModalityState.ok, None, rgb)
