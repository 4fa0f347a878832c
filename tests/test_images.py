"""Image decoding: unusual but valid images are converted; broken, hostile or refused ones get a per-row code.

The random-bytes property test and the memory bound are in tests/test_decode_fuzz.py.
"""

from __future__ import annotations

import io
import time
import warnings

import hostile_images as hostile
import numpy as np
import pytest
from PIL import Image, ImageFile

from vb_batch.errors import RowError
from vb_batch.io.images import (
    DECODABLE_FORMATS,
    DEFAULT_FORMATS,
    decode_image,
    sniff_format,
)

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
        lambda: encode(Image.fromarray(RGB[..., 0].astype(np.uint16) * 257), "PNG"),
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


# ---------------------------------------------------------------------------- format allowlist


@pytest.mark.parametrize("fmt", sorted(hostile.VALID_BY_FORMAT))
def test_every_decodable_format_decodes_when_allowed(fmt):
    data = hostile.VALID_BY_FORMAT[fmt]()
    rgb = decode_image(data, max_pixels=10_000, formats=[fmt])
    assert rgb.dtype == np.uint8 and rgb.shape == ((32, 32, 3) if fmt == "CUR" else (20, 30, 3))
    if fmt != "CUR":
        assert np.abs(rgb.astype(int)[..., 1] - RGB[..., 1]).mean() < 12


@pytest.mark.parametrize("fmt", ["ICO", "CUR", "QOI", "DDS", "PSD", "TGA", "PPM"])
def test_formats_outside_the_allowlist_are_refused_by_name(fmt):
    data = hostile.VALID_BY_FORMAT[fmt]()
    with pytest.raises(RowError) as info:
        decode_image(data, max_pixels=10_000)  # the default input.image_formats
    if fmt == "TGA":  # no magic bytes: no allowed plugin may even try it
        assert info.value.code == "not_image"
    else:
        assert info.value.code == "unsupported_format"
        assert fmt in info.value.message and "input.image_formats" in info.value.message


def test_allowlist_is_case_insensitive_and_keeps_mpo_apart_from_jpeg():
    assert decode_image(hostile.VALID_BY_FORMAT["QOI"](), 10_000, formats=["qoi"]).shape == (20, 30, 3)
    mpo, jpeg = hostile.valid_mpo(), hostile.VALID_BY_FORMAT["JPEG"]()
    assert decode_image(mpo, 10_000, formats=["MPO"]).shape == (20, 30, 3)
    for data, formats, named in ((mpo, ["JPEG"], "MPO"), (jpeg, ["MPO"], "JPEG")):
        with pytest.raises(RowError) as info:
            decode_image(data, 10_000, formats=formats)
        assert info.value.code == "unsupported_format" and named in info.value.message


def test_a_listed_format_whose_size_cannot_be_checked_first_is_refused():
    icns = hostile.encode(hostile.ramp("RGBA").resize((32, 32)), "ICNS")  # its PNGs can hide any size
    assert "ICNS" not in DECODABLE_FORMATS and sniff_format(icns) == "ICNS"
    with pytest.raises(RowError) as info:
        decode_image(icns, 10_000, formats=["PNG", "ICNS"])
    assert info.value.code == "unsupported_format" and "cannot be checked" in info.value.message


def test_default_formats_are_the_config_default():
    assert list(DEFAULT_FORMATS) == ["JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF"]


def test_max_bytes_refuses_big_cells_before_opening():
    data = encode(Image.fromarray(RGB), "PNG")
    assert decode_image(data, 10_000, max_bytes=len(data)).shape == (20, 30, 3)
    with pytest.raises(RowError) as info:
        decode_image(data, 10_000, max_bytes=len(data) - 1)
    assert info.value.code == "too_large" and "input.max_bytes" in info.value.message


# ---------------------------------------------------------------------------- hostile rows


@pytest.mark.parametrize("row_id", sorted(hostile.HOSTILE_IMAGES))
def test_hostile_rows_get_their_code(row_id):
    make, code = hostile.HOSTILE_IMAGES[row_id]
    data = make()
    with pytest.raises(RowError) as info:
        decode_image(data, max_pixels=10_000_000, min_side=8)
    assert info.value.code == code, info.value.message
    if row_id in hostile.ALLOWED_CODES:
        formats, allowed_code = hostile.ALLOWED_CODES[row_id]
        with pytest.raises(RowError) as info:
            decode_image(data, max_pixels=10_000_000, min_side=8, formats=[*DEFAULT_FORMATS, *formats])
        assert info.value.code == allowed_code, info.value.message


def test_the_escaping_exceptions_are_the_ones_pillow_raises():
    """The regression bytes still make Pillow itself raise what once escaped `decode_image`."""
    with pytest.raises(IndexError):
        Image.open(io.BytesIO(hostile.qoi_index_error())).load()
    for data in (hostile.dds_not_implemented(), hostile.dds_dx10_not_implemented()):
        with pytest.raises(NotImplementedError):
            Image.open(io.BytesIO(data))


@pytest.mark.parametrize("fmt", sorted(hostile.HEADER_BOMBS))
def test_every_decodable_format_is_size_checked_on_its_header(fmt):
    bomb = hostile.HEADER_BOMBS[fmt]()
    start = time.perf_counter()
    with pytest.raises(RowError) as info:
        decode_image(bomb, max_pixels=10_000_000, formats=[fmt])
    assert info.value.code == "too_large", info.value.message
    assert time.perf_counter() - start < 2.0  # refused on the header (measured: < 5 ms), not after a decode


@pytest.mark.parametrize(
    "data",
    [
        hostile.ico_png_declaring(*hostile.HUGE),  # an icon's PNG declares the size, not its directory
        hostile.gif_declaring(60_000, 60_000),
        hostile.tiff_declaring(*hostile.HUGE),
        hostile.webp_lossless_declaring(16_384, 16_384),
        # IHDR twice: Pillow keeps the last one, so the check must read the size Pillow read.
        hostile.png_declaring(30, 20)[:33] + hostile.png_declaring(*hostile.HUGE)[8:],
    ],
    ids=["ico-png-ihdr", "gif-screen", "tiff-size", "webp-vp8l", "png-two-ihdr"],
)
def test_more_header_bombs(data):
    with pytest.raises(RowError) as info:
        decode_image(data, max_pixels=10_000_000, formats=DECODABLE_FORMATS)
    assert info.value.code == "too_large", info.value.message


def test_an_icon_is_checked_by_the_icon_pillow_decodes():
    small, bomb = hostile.valid_ico()[22:], hostile.png_declaring(*hostile.HUGE)  # 30 x 20, 40000 x 40000
    # Pillow decodes the icon its directory lists as largest: here the bomb...
    with pytest.raises(RowError) as info:
        decode_image(hostile.ico([small, bomb], [(30, 20), (64, 64)]), 10_000, formats=["ICO"])
    assert info.value.code == "too_large"
    # ...here the 30 x 20 one, and the bomb's bytes are never read.
    assert decode_image(hostile.ico([small, bomb], [(30, 20), (16, 16)]), 10_000, formats=["ICO"]).shape == (20, 30, 3)


def test_tiles_within_the_pixel_limit_decode():
    rgb = decode_image(hostile.tiff(64, 64, tile=(64, 64), deflate=True), max_pixels=10_000)
    assert rgb.shape == (64, 64, 3) and rgb[0, :4, 0].tolist() == [0, 1, 2, 3]


def test_animations_and_pages_give_their_first_frame():
    first, second = Image.fromarray(RGB), Image.fromarray(255 - RGB)
    for fmt, kw in (("TIFF", {}), ("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})):
        data = encode(first, fmt, save_all=True, append_images=[second], **kw)
        rgb = decode_image(data, max_pixels=10_000)
        assert np.abs(rgb.astype(int) - RGB).mean() < 12, fmt
    # 20,000 pages: only the first is read, so this takes milliseconds, not a walk of every page.
    many_pages = hostile.tiff(30, 20, pages=20_000)
    start = time.perf_counter()
    assert decode_image(many_pages, max_pixels=10_000).shape == (20, 30, 3)
    assert time.perf_counter() - start < 1.0  # measured: 1 ms


# ---------------------------------------------------------------------------- every exception is the row's


@pytest.fixture
def tga_plugin():
    """Replace Pillow's TGA opener (the one format without magic bytes) with one raising `exc`."""
    saved = Image.OPEN["TGA"]

    def install(exc: BaseException) -> None:
        class Raising(ImageFile.ImageFile):
            format = "TGA"

            def _open(self):
                raise exc

        Image.register_open("TGA", Raising)

    yield install
    Image.OPEN["TGA"] = saved


@pytest.mark.parametrize(
    "exc, code",
    [
        (MemoryError(), "too_large"),
        (Image.DecompressionBombError("bomb"), "too_large"),
        (Image.DecompressionBombWarning("bomb"), "too_large"),
        (NotImplementedError("a new variant"), "decode_error"),
        (RecursionError("deep"), "decode_error"),
        (ValueError("bad value"), "corrupt"),
        (OSError("image file is truncated"), "truncated"),
        (ZeroDivisionError("division by zero"), "decode_error"),
    ],
)
def test_any_exception_while_decoding_is_a_row_error(tga_plugin, exc, code):
    tga_plugin(exc)
    with pytest.raises(RowError) as info:
        decode_image(b"\x07no magic bytes here" * 4, max_pixels=10_000, formats=["TGA"])
    assert info.value.code == code
    if code == "decode_error":
        assert type(exc).__name__ in info.value.message


def test_pillow_bomb_checks_are_row_errors_if_someone_turns_them_back_on(monkeypatch):
    """Another library may set Image.MAX_IMAGE_PIXELS again; its error (and warning, if made an error) is the row's."""
    data = encode(Image.fromarray(RGB), "PNG")  # 600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 > 2 x 100: DecompressionBombError
    with pytest.raises(RowError) as info:
        decode_image(data, max_pixels=10_000)
    assert info.value.code == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 600 > 400: DecompressionBombWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RowError) as info:
            decode_image(data, max_pixels=10_000)
    assert info.value.code == "too_large"


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_interrupts_are_not_a_row_error(tga_plugin, exc):
    tga_plugin(exc)
    with pytest.raises(type(exc)):
        decode_image(b"\x07no magic bytes here" * 4, max_pixels=10_000, formats=["TGA"])


# ---------------------------------------------------------------------------- the decode stage


@pytest.mark.parametrize(
    "input_section, qoi_code",
    [({}, "unsupported_format"), ({"image_formats": ["PNG", "QOI"]}, None), ({"max_bytes": 1000}, "too_large")],
)
def test_the_decode_stage_applies_image_formats_and_max_bytes(tmp_path, input_section, qoi_code):
    import pyarrow as pa

    from vb_batch.config import JobConfig
    from vb_batch.stages import Plan, fetch_decode

    job = {
        "input": {"path": str(tmp_path / "in.parquet"), "image_column": "image", **input_section},
        "output": {"path": str(tmp_path / "out")},
        "tasks": ["depth"],
        "model": {"backend": "demo"},
    }
    qoi, png = hostile.VALID_BY_FORMAT["QOI"](), hostile.VALID_BY_FORMAT["PNG"]()
    assert len(qoi) > 1000 > len(png)
    batch = pa.record_batch({"id": ["qoi", "png"], "image": pa.array([qoi, png], pa.binary())})
    # Only the input section matters to the stage; Plan.build would also resolve (and import) the model.
    cfg = JobConfig.model_validate(job)
    plan = Plan(
        cfg=cfg, ctx=None, tasks=[], native_tasks=frozenset(), profile="", model="", run_id="run",
        input_schema=batch.schema, image_column="image",
    )
    decoded = fetch_decode(batch, plan)
    errors = decoded.column("vb_error").to_pylist()
    assert [e and e["code"] for e in errors] == [qoi_code, None]


# ---------------------------------------------------------------------------- bounded work per row


def test_a_scan_bomb_is_refused_before_decoding():
    bomb = hostile.jpeg_scan_bomb()
    started = time.thread_time()
    with pytest.raises(RowError) as info:
        decode_image(bomb, max_pixels=10_000_000)
    assert time.thread_time() - started < 0.5  # counted, not decoded (in full: ~28 s of CPU)
    assert info.value.code == "decode_timeout" and "input.max_jpeg_scans=100" in info.value.message


@pytest.mark.parametrize("budget", [0.3, 1.0])
def test_a_row_stops_at_its_cpu_budget_whatever_the_scan_limit(budget):
    bomb = hostile.jpeg_scan_bomb()
    started = time.thread_time()
    with pytest.raises(RowError) as info:
        decode_image(bomb, max_pixels=10_000_000, max_jpeg_scans=10**6, timeout_s=budget)
    spent = time.thread_time() - started
    assert info.value.code == "decode_timeout" and f"input.decode_timeout_s={budget:g}" in info.value.message
    # At most one chunk's scans (4 kB of ~16-byte scans at ~3 ms each here) run past the budget.
    assert budget <= spent < budget + 1.5, spent


def test_ordinary_progressive_jpegs_decode_within_the_limits():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (256, 384, 3), dtype=np.uint8))
    data = hostile.encode(image, "JPEG", quality=90, progressive=True)
    assert decode_image(data, 10**6, timeout_s=0.5, max_jpeg_scans=10).shape == (256, 384, 3)
    with pytest.raises(RowError, match="has 10 scans, more than input.max_jpeg_scans=9"):
        decode_image(data, 10**6, max_jpeg_scans=9)


@pytest.mark.parametrize("text", [b"[default]\naws_secret_access_key = x\n", b"root:x:0:0:root:/root:/bin/bash\n",
                                  b"\x89PNG\r\n\x1a\nroot:x:0:0"])
def test_messages_never_quote_the_bytes(text):
    with pytest.raises(RowError) as info:
        decode_image(text, 10**6)
    assert info.value.code in ("not_image", "corrupt", "truncated")
    assert "default" not in info.value.message and "root" not in info.value.message
