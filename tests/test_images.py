"""Image decoding: unusual but valid images are converted, broken ones get a per-row error code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vb_batch.errors import RowError
from vb_batch.io.images import decode_image

NOISE = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
RGB = np.dstack([np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))] * 3)  # 20 x 30


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.fromarray(RGB), "PNG"),
        lambda: encode(Image.fromarray(RGB).convert("RGBA"), "PNG"),
        lambda: encode(Image.fromarray(RGB).convert("L"), "PNG"),
        lambda: encode(Image.fromarray(RGB).quantize(32), "PNG"),
        lambda: encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95),
        lambda: encode(Image.fromarray(RGB).convert("CMYK"), "TIFF"),
        lambda: encode(Image.fromarray(RGB), "WEBP", lossless=True),
        lambda: encode(Image.fromarray(RGB), "GIF"),
        lambda: encode(Image.fromarray(RGB), "BMP"),
        lambda: encode(Image.fromarray((RGB[..., 0].astype(np.uint16) * 257)), "PNG"),
    ],
    ids=["rgb", "rgba", "grey", "palette", "cmyk-jpeg", "cmyk-tiff", "webp", "gif", "bmp", "grey16"],
)
def test_valid_images_decode_to_rgb(make):
    rgb = decode_image(make(), max_pixels=10_000)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    # Every mode keeps the horizontal ramp (within palette / JPEG error).
    assert np.abs(rgb.astype(int)[..., 1] - RGB[..., 1]).mean() < 12


def test_exif_orientation_is_applied():
    image = Image.fromarray(RGB).transpose(Image.Transpose.ROTATE_90)  # stored 30 x 20
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    rgb = decode_image(encode(image, "JPEG", quality=95, exif=exif), max_pixels=10_000)
    assert rgb.shape == (20, 30, 3)


@pytest.mark.parametrize(
    "data, code",
    [
        (None, "null_image"),
        (b"", "empty"),
        (b"plain text, not an image at all", "not_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
        (encode(Image.fromarray(NOISE), "PNG")[:900], "truncated"),
        (encode(Image.fromarray(NOISE), "JPEG")[:600], "truncated"),
    ],
)
def test_broken_images_raise_row_errors(data, code):
    with pytest.raises(RowError) as info:
        decode_image(data, max_pixels=10_000)
    assert info.value.code == code


def test_pixel_limit_and_min_side():
    with pytest.raises(RowError) as info:
        decode_image(encode(Image.fromarray(RGB), "PNG"), max_pixels=100)
    assert info.value.code == "too_large"
    with pytest.raises(RowError) as info:
        decode_image(encode(Image.fromarray(RGB[:4]), "PNG"), max_pixels=10_000, min_side=8)
    assert info.value.code == "too_small"
