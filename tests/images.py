"""Image builders shared by the media and hostile-input tests (no tests here).

The bombs are hand-built PNGs: the header may claim any size and the pixels are compressed row by row, so
a test can make a gigapixel image without ever holding its pixels.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """``im`` saved in format ``fmt`` (Pillow's name), as bytes."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_base64(colour: tuple[int, int, int] = (220, 40, 40), size: tuple[int, int] = (40, 30)) -> str:
    """A solid-colour PNG as a post's ``image.base64`` value."""
    return base64.b64encode(encode(Image.new("RGB", size, colour), "PNG")).decode()


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def grey_png(width: int, height: int, idat: bytes) -> bytes:
    """A hand-built 8-bit greyscale PNG whose header may claim any size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def solid_png_bomb(side: int) -> bytes:
    """A real side x side black PNG, compressed row by row so the test never holds the pixels."""
    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return grey_png(side, side, idat)
