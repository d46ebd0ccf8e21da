"""Decoding a post's image field: every hostile or odd image becomes a state, never an exception.

All images are generated here (Pillow writes the odd modes; the bombs are hand-built PNGs).
URL and local-path sources are covered in test_media_fetch.py.
"""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from connectors.media import (
    DecodedImage,
    FetchPolicy,
    ImageState,
    MediaLimits,
    decode_image_bytes,
    decode_image_field,
)

LIMITS = MediaLimits()
# No network and no local files: any URL host other than this never-resolving name is refused first.
OFFLINE = FetchPolicy(allowed_hosts=("images.invalid",))
REPO = Path(__file__).resolve().parents[1]


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def as_field(data: bytes) -> dict[str, str]:
    return {"base64": base64.b64encode(data).decode("ascii")}


def decode(data: bytes, limits: MediaLimits = LIMITS) -> DecodedImage:
    return decode_image_field(as_field(data), limits, OFFLINE)


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


def assert_valid(result: DecodedImage) -> None:
    assert isinstance(result.state, ImageState)
    assert result.nbytes >= 0
    if result.state is ImageState.ok:
        assert result.reason is None
        assert isinstance(result.image, Image.Image) and result.image.mode == "RGB"
        assert min(result.image.size) > 0
    else:
        assert result.image is None
    if result.state is ImageState.undecodable:
        assert isinstance(result.reason, str) and result.reason


def close_to(pixel: tuple[int, ...], expected: tuple[int, int, int], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


# --- the field's shape --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "state", "reason"),
    [
        (None, ImageState.missing, None),
        ({"base64": ""}, ImageState.empty, "empty_value"),
        ({"base64": " \n "}, ImageState.empty, "empty_value"),
        ({"url": ""}, ImageState.empty, "empty_value"),
        ("aGVsbG8=", ImageState.undecodable, "field_not_object"),
        ([{"base64": "aGVsbG8="}], ImageState.undecodable, "field_not_object"),
        ({}, ImageState.undecodable, "field_bad_keys"),
        (
            {"base64": "aGVsbG8=", "url": "https://images.invalid/a.jpg"},
            ImageState.undecodable,
            "field_bad_keys",
        ),
        ({"file": "a.jpg"}, ImageState.undecodable, "field_bad_keys"),
        ({"base64": None}, ImageState.undecodable, "field_value_not_string"),
        ({"url": 5}, ImageState.undecodable, "field_value_not_string"),
        ({"base64": "not base64 at all!"}, ImageState.undecodable, "base64_invalid"),
        ({"base64": "ééé"}, ImageState.undecodable, "base64_invalid"),
        ({"base64": "QUJDR"}, ImageState.undecodable, "base64_invalid"),  # 5 data chars
        ({"path": "a.jpg"}, ImageState.undecodable, "path_refused"),
        ({"url": "https://evil.example/a.jpg"}, ImageState.undecodable, "fetch_refused_host"),
    ],
)
def test_field_shapes(field: object, state: ImageState, reason: str | None) -> None:
    result = decode_image_field(field, LIMITS, OFFLINE)
    assert (result.state, result.reason, result.image) == (state, reason, None)


def test_zero_bytes_are_empty() -> None:
    result = decode_image_bytes(b"", LIMITS)
    assert (result.state, result.reason, result.nbytes) == (ImageState.empty, "zero_bytes", 0)


def test_base64_variants_decode() -> None:
    data = encode(Image.new("RGB", (7, 5), (10, 200, 30)), "PNG")
    std = base64.b64encode(data).decode()
    variants = [
        std,
        "data:image/png;base64," + std,
        "\n".join(std[i : i + 76] for i in range(0, len(std), 76)),  # MIME line wrapping
        base64.urlsafe_b64encode(data).decode().rstrip("="),  # URL-safe alphabet, unpadded
    ]
    for text in variants:
        result = decode_image_field({"base64": text}, LIMITS, OFFLINE)
        assert result.state is ImageState.ok, text[:40]
        assert result.image is not None and result.image.getpixel((3, 2)) == (10, 200, 30)
        assert result.nbytes == len(data)


# --- ordinary and odd images --------------------------------------------------------------------


def test_plain_jpeg_decodes_to_rgb() -> None:
    data = encode(Image.new("RGB", (64, 48), (200, 30, 40)), "JPEG", quality=95)
    result = decode(data)
    assert_valid(result)
    assert result.state is ImageState.ok and result.image is not None
    assert result.image.size == (64, 48)
    assert close_to(result.image.getpixel((30, 20)), (200, 30, 40))
    assert result.nbytes == len(data)


def test_large_jpeg_is_decoded_in_draft_mode() -> None:
    data = encode(Image.new("RGB", (2400, 1800), (0, 90, 200)), "JPEG")
    reduced = decode(data)
    assert reduced.image is not None
    assert reduced.image.size == (600, 450)  # libjpeg's 1/4 scale: the smallest still >= 448 x 448
    full = decode(data, MediaLimits(draft_size=(2400, 1800)))
    assert full.image is not None and full.image.size == (2400, 1800)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    result = decode(data)
    assert result.image is not None and result.image.mode == "RGB"
    assert close_to(result.image.getpixel((8, 8)), (255, 0, 0))


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    data = encode(Image.new("I;16", (8, 8), 32768), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    result = decode(data)
    assert result.image is not None
    assert close_to(result.image.getpixel((4, 4)), (128, 128, 128), tol=1)


@pytest.mark.parametrize(
    ("mode", "color", "fmt", "expected"),
    [
        ("RGBA", (0, 0, 0, 0), "PNG", (255, 255, 255)),  # fully transparent -> white background
        ("RGBA", (0, 0, 0, 255), "PNG", (0, 0, 0)),
        ("RGBA", (255, 0, 0, 128), "PNG", (255, 127, 127)),  # half alpha blends with white
        ("LA", (0, 0), "PNG", (255, 255, 255)),
        ("L", 77, "PNG", (77, 77, 77)),
        ("1", 1, "BMP", (255, 255, 255)),
        ("RGBA", (0, 0, 0, 0), "WEBP", (255, 255, 255)),
    ],
)
def test_modes_become_rgb(mode: str, color: object, fmt: str, expected: tuple[int, int, int]) -> None:
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    result = decode(encode(Image.new(mode, (6, 6), color), fmt, **kwargs))  # type: ignore[arg-type]
    assert result.image is not None and result.image.mode == "RGB"
    assert close_to(result.image.getpixel((3, 3)), expected, tol=2)


def test_palette_transparency_is_white() -> None:
    im = Image.new("P", (6, 6), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    result = decode(encode(im, "GIF", transparency=0))
    assert result.image is not None
    assert result.image.getpixel((3, 3)) == (255, 255, 255)
    assert result.image.getpixel((1, 1)) == (255, 0, 0)


def test_animated_gif_gives_first_frame() -> None:
    red, blue = Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (10, 10), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    result = decode(data)
    assert result.image is not None
    assert close_to(result.image.getpixel((5, 5)), (255, 0, 0))


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    result = decode(encode(im, "JPEG", exif=exif, quality=95))
    assert result.image is not None
    assert result.image.size == (20, 40)
    assert close_to(result.image.getpixel((10, 5)), (255, 0, 0), tol=30)
    assert close_to(result.image.getpixel((10, 35)), (0, 0, 255), tol=30)


# --- hostile bytes ------------------------------------------------------------------------------


def test_png_header_claiming_30000_square_is_refused() -> None:
    result = decode(grey_png(30000, 30000, zlib.compress(b"\x00" * 30001)))
    assert (result.state, result.reason) == (ImageState.undecodable, "too_many_pixels")


def test_solid_png_bomb_is_refused() -> None:
    data = solid_png_bomb(8000)  # 64 Mpx of black in ~64 KB
    assert len(data) < 200_000
    assert decode(data).reason == "too_many_pixels"


def test_pixel_limit_is_per_call_not_global() -> None:
    before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    assert decode(data, MediaLimits(max_image_pixels=399)).reason == "too_many_pixels"
    assert decode(data, MediaLimits(max_image_pixels=400)).state is ImageState.ok
    assert Image.MAX_IMAGE_PIXELS == before


_RSS_PROBE = """
import sys
from connectors.media import MediaLimits, decode_image_bytes
def peak_kib():
    # VmHWM belongs to this process image; ru_maxrss would carry over the (large) pytest parent's peak across exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
data = sys.stdin.buffer.read()
limits = MediaLimits(max_image_pixels=int(sys.argv[1]))
decode_image_bytes(b"x", limits)  # import-time and first-call costs before the baseline
before = peak_kib()
result = decode_image_bytes(data, limits)
after = peak_kib()
print(result.state.value, result.reason, (after - before) / 1024)
"""


def _peak_growth_mb(data: bytes, max_pixels: int) -> tuple[str, str, float]:
    """Decode in a fresh process and report how much its peak RSS grew, in MB.

    RSS rather than tracemalloc: tracemalloc cannot see Pillow's C pixel buffers.
    """
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(max_pixels)],
        input=data,
        capture_output=True,
        cwd=REPO,
        check=True,
        timeout=120,
    ).stdout.decode()
    state, reason, growth = out.split()
    return state, reason, float(growth)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status (Linux)")
def test_bomb_is_refused_without_allocating_it() -> None:
    data = solid_png_bomb(8000)
    state, reason, growth = _peak_growth_mb(data, LIMITS.max_image_pixels)
    assert (state, reason) == ("undecodable", "too_many_pixels")
    assert growth < 50
    # The probe does see a real decode of the same bytes (64 MB greyscale + 192 MB RGB):
    state, _, growth = _peak_growth_mb(data, 10**9)
    assert state == "ok" and growth > 100


def test_oversized_input_is_refused_before_decoding() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    small = MediaLimits(max_image_bytes=len(data) - 1)
    assert decode(data, small).reason == "too_large"
    assert decode_image_bytes(data, small).reason == "too_large"
    assert decode(data, MediaLimits(max_image_bytes=len(data))).state is ImageState.ok


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_truncated_image(fmt: str) -> None:
    data = encode(Image.effect_noise((120, 90), 60).convert("RGB"), fmt)
    result = decode(data[: len(data) * 2 // 3])
    assert (result.state, result.reason) == (ImageState.undecodable, "truncated")


def test_random_bytes_are_not_an_image() -> None:
    rnd = bytes((i * 7919 + 13) % 251 for i in range(4096))
    assert decode(rnd).reason == "not_an_image"


def test_formats_outside_the_allow_list_are_not_parsed() -> None:
    tiff = encode(Image.new("RGB", (4, 4), (1, 2, 3)), "TIFF")
    assert decode(tiff).reason == "not_an_image"
    assert decode(tiff, MediaLimits(formats=("TIFF",))).state is ImageState.ok
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # would run Ghostscript
    assert decode(eps).reason == "not_an_image"


def test_bad_limits_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="formats"):
        MediaLimits(formats=("JPEG", "HEIC-NOPE"))
    with pytest.raises(ValueError, match="max_image_bytes"):
        MediaLimits(max_image_bytes=0)
    with pytest.raises(ValueError, match="draft_size"):
        MediaLimits(draft_size=(0, 448))


def test_concurrent_decoding_matches_sequential() -> None:
    inputs = [
        encode(Image.effect_noise((300, 200), 40).convert("RGB"), "JPEG"),
        encode(Image.new("RGBA", (50, 50), (0, 0, 0, 0)), "PNG"),
        encode(Image.new("CMYK", (80, 60), (10, 20, 30, 40)), "JPEG"),
        solid_png_bomb(2000),
        b"garbage" * 100,
    ] * 4

    def fingerprint(data: bytes) -> tuple[object, ...]:
        r = decode(data, MediaLimits(max_image_pixels=3_000_000))
        return (r.state, r.reason, r.image.size if r.image else None, r.image.tobytes() if r.image else None)

    expected = [fingerprint(d) for d in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(fingerprint, inputs)) == expected


# --- properties ---------------------------------------------------------------------------------

SIGNATURES = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
image_fields = st.dictionaries(
    st.sampled_from(["base64", "url", "path"]),
    json_values | st.text(max_size=40) | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    min_size=1,
    max_size=2,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(SIGNATURES), body=st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(prefix: bytes, body: bytes) -> None:
    assert_valid(decode_image_bytes(prefix + body, LIMITS))
    assert_valid(decode(prefix + body))


@settings(max_examples=300, deadline=None)
@given(field=json_values | image_fields)
def test_arbitrary_json_never_raises(field: object) -> None:
    assert_valid(decode_image_field(field, LIMITS, OFFLINE))
