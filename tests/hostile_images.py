"""Hostile image bytes for `decode_image`: header bombs, container bombs and bytes that once escaped.

Every maker is deterministic (no randomness, no files), so a failing row can be rebuilt
byte for byte. `hostile_images()` is the table for tests/hostile.py: {id: (bytes, code)},
where code is what `decode_image` must answer under the default `input.image_formats`
with `input.max_pixels` at most 10 million. `ALLOWED_CODES` says what the same bytes
give when their format is added to `input.image_formats`.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

# 20 x 30 RGB ramp: small, but with real pixel data in every format.
RAMP = np.dstack([np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))] * 3)
HUGE = (40_000, 40_000)  # 1.6 billion pixels: far above any input.max_pixels


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def ramp(mode: str = "RGB") -> Image.Image:
    return Image.fromarray(RAMP).convert(mode)


# ------------------------------------------------------------------ headers declaring a size
# Each takes a small valid file of its format and rewrites the header's width and height,
# so only a check on the header (not the pixel data) can stop it.


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, source: bytes | None = None) -> bytes:
    """A PNG whose IHDR says width x height (CRC kept valid), over a 30 x 20 image's data."""
    data = source or encode(ramp(), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:]


def _gif_descriptor_offset(data: bytes) -> int:
    """Offset of the first image descriptor (0x2C) of a GIF, past the colour table and extensions."""
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:  # extension: label, then sub-blocks up to a zero length
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C, "no image descriptor"
    return pos


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height (the frame stays 30 x 20)."""
    data = encode(ramp(), "GIF")
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def gif_frame_declaring(width: int, height: int) -> bytes:
    """A GIF with a 30 x 20 screen whose first frame's descriptor says width x height."""
    data = bytearray(encode(ramp(), "GIF"))
    pos = _gif_descriptor_offset(bytes(data))
    data[pos + 5 : pos + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(ramp(), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _sof_declaring(data: bytes, width: int, height: int) -> bytes:
    """`data` (a JPEG) with its first SOF marker saying width x height."""
    out = bytearray(data)
    pos = 2
    while out[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", out[pos + 2 : pos + 4])[0]
    out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def jpeg_declaring(width: int, height: int) -> bytes:
    return _sof_declaring(encode(ramp(), "JPEG", quality=90), width, height)


def jpeg_scan_bomb(repeats: int = 10_000, side: int = 2048) -> bytes:
    """A progressive JPEG whose last scan is repeated `repeats` times: ~16 bytes per scan, each a pass.

    A flat 2048 x 2048 picture's last (AC refinement) scan is tiny but still visits every block, so
    10,000 of them (185 kB) cost about 28 s of CPU to decode in full (the issue's 1.33 MB one: 45 s).
    """
    data = encode(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", quality=90, progressive=True)
    pos, last_scan = 2, None
    while data[pos + 1] != 0xD9:  # walk the segments up to EOI; a scan runs to the next real marker
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if data[pos + 1] == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            last_scan = (pos, end)
        pos = end
    start, end = last_scan
    return data[:end] + data[start:end] * repeats + data[end:]


def valid_mpo() -> bytes:
    """A two-frame MPO (a JPEG with an index of further JPEGs), as cameras write for stereo pairs."""
    return encode(ramp(), "MPO", save_all=True, append_images=[ramp().transpose(Image.Transpose.FLIP_LEFT_RIGHT)])


def mpo_declaring(width: int, height: int) -> bytes:
    return _sof_declaring(valid_mpo(), width, height)


def webp_lossless_declaring(width: int, height: int) -> bytes:
    """A simple (VP8L) WebP whose bitstream header says width x height (at most 16384 each)."""
    data = bytearray(encode(ramp(), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
    data[21:25] = struct.pack("<I", bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def webp_canvas_declaring(width: int, height: int) -> bytes:
    """An animated (VP8X) WebP whose canvas is width x height; its two frames stay 30 x 20.

    libwebp's animation decoder, which Pillow creates in `Image.open`, allocates the canvas
    twice at 4 bytes a pixel (16384 x 16384: 2 GiB) before Pillow knows the size.
    """
    frames = [ramp(), ramp().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = bytearray(encode(frames[0], "WEBP", lossless=True, save_all=True, append_images=frames[1:]))
    assert data[12:16] == b"VP8X"
    data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


def qoi_declaring(width: int, height: int) -> bytes:
    data = encode(ramp(), "QOI")
    return data[:4] + struct.pack(">II", width, height) + data[12:]


def dds_declaring(width: int, height: int) -> bytes:
    data = encode(ramp(), "DDS")
    return data[:12] + struct.pack("<II", height, width) + data[20:]


def psd_declaring(width: int, height: int) -> bytes:
    """A PSD (written by hand: Pillow cannot save PSD) with raw RGB data for 30 x 20."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    pixels = b"".join(RAMP[..., c].tobytes() for c in range(3))
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + pixels


def tga_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(ramp(), "TGA"))
    data[12:16] = struct.pack("<HH", width, height)
    return bytes(data)


def ppm_declaring(width: int, height: int) -> bytes:
    return f"P6\n{width} {height}\n255\n".encode() + RAMP.tobytes()


_TIFF_SHORT_TAGS = {258, 259, 262, 277}  # BitsPerSample, Compression, Photometric, SamplesPerPixel


def tiff(
    width: int,
    height: int,
    *,
    tile: tuple[int, int] | None = None,
    pages: int = 1,
    deflate: bool = False,
    pixels: bytes | None = None,
) -> bytes:
    """A little-endian 8-bit grey TIFF written by hand, so every tag can say what a test needs.

    One strip, or one tile of `tile` = (width, height), holds `pixels` (default: a ramp of the
    declared size), deflated if asked; `pages` IFDs chain one after another to the same data.
    """
    if pixels is None:
        pixels = (bytes(range(256)) * (width * height // 256 + 1))[: width * height]
    body = zlib.compress(pixels, 9) if deflate else pixels
    body += b"\x00" * (len(body) & 1)  # IFDs start on a word boundary
    data_at = 8
    if tile:  # TileWidth, TileLength, TileOffsets, TileByteCounts
        layout = [(322, tile[0]), (323, tile[1]), (324, data_at), (325, len(body))]
    else:  # StripOffsets, RowsPerStrip, StripByteCounts
        layout = [(273, data_at), (278, height), (279, len(body))]
    tags = sorted([(256, width), (257, height), (258, 8), (259, 8 if deflate else 1), (262, 1), (277, 1), *layout])
    first_ifd, ifd_size = data_at + len(body), 2 + 12 * len(tags) + 4
    entries = b"".join(struct.pack("<HHII", tag, 3 if tag in _TIFF_SHORT_TAGS else 4, 1, value) for tag, value in tags)
    ifds = [
        struct.pack("<H", len(tags)) + entries + struct.pack("<I", first_ifd + page * ifd_size if page < pages else 0)
        for page in range(1, pages + 1)
    ]
    return b"".join([b"II*\x00", struct.pack("<I", first_ifd), body, *ifds])


def tiff_declaring(width: int, height: int) -> bytes:
    """A TIFF whose tags say width x height over a 30 x 20 strip."""
    return tiff(width, height, pixels=RAMP[..., 0].tobytes())


def tiff_huge_tile() -> bytes:
    """A 64 x 64 TIFF cut in one deflated 32768 x 32768 tile: libtiff sizes its buffer by the tile."""
    return tiff(64, 64, tile=(32768, 32768), deflate=True, pixels=bytes(64 * 64))


# ------------------------------------------------------------------ icons: a container of images


def ico(images: list[bytes], sizes: list[tuple[int, int]] | None = None, kind: int = 1) -> bytes:
    """An ICO (kind 1) or CUR (kind 2) holding `images` (PNG or DIB bytes); the directory says `sizes`."""
    sizes = sizes or [(16, 16)] * len(images)
    offset = 6 + 16 * len(images)
    directory, blobs = b"", b""
    for (width, height), blob in zip(sizes, images, strict=True):
        directory += struct.pack("<BBBBHHII", width % 256, height % 256, 0, 0, 1, 32, len(blob), offset)
        offset += len(blob)
        blobs += blob
    return struct.pack("<HHH", 0, kind, len(images)) + directory + blobs


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height alternating pixels: identical rows deflate about 1000:1.

    Written row by row, so making it costs no pixel buffer.
    """
    row = b"\x00" + b"\x55" * ((width + 7) // 8)  # filter byte "none", then 8 pixels a byte
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def ico_png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """An ICO whose directory says 16 x 16 but whose PNG really holds width x height pixels.

    400 million pixels in about 76 kB; Pillow's ICO plugin decodes them inside `Image.open`,
    before anyone can read the size: 385 MB of peak memory for this one-bit bomb, 1.5 GB for
    the 1.6 MB RGBA one that was reported.
    """
    return ico([png_bomb(width, height)])


def ico_png_declaring(width: int, height: int) -> bytes:
    """An ICO whose directory says 16 x 16 and whose PNG's IHDR says width x height."""
    return ico([png_declaring(width, height)])


def dib_declaring(width: int, height: int, bits: int = 32) -> bytes:
    """An ICO-style DIB: BITMAPINFOHEADER (height counts the XOR and AND masks) and 64 bytes of data."""
    return struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, bits, 0, 0, 0, 0, 0, 0) + bytes(64)


def ico_bmp_declaring(width: int, height: int) -> bytes:
    return ico([dib_declaring(width, height)])


def valid_ico() -> bytes:
    return encode(ramp("RGBA"), "ICO", sizes=[(30, 20)])


def valid_cur() -> bytes:
    """A 32 x 32 cursor with a 32-bit DIB (Pillow cannot write CUR)."""
    rows = np.zeros((32, 32, 4), np.uint8)
    rows[..., 1] = np.arange(32, dtype=np.uint8)[None, :] * 8
    rows[..., 3] = 255
    dib = struct.pack("<IiiHHIIiiII", 40, 32, 64, 1, 32, 0, 0, 0, 0, 0, 0) + rows[::-1].tobytes() + bytes(32 * 4)
    return ico([dib], [(32, 32)], kind=2)


def cur_declaring(width: int, height: int) -> bytes:
    return ico([dib_declaring(width, height)], [(32, 32)], kind=2)


# ------------------------------------------------------------------ one sample per decodable format

# A small valid file per format vb_batch can decode (30 x 20, the cursor 32 x 32).
VALID_BY_FORMAT: dict[str, Callable[[], bytes]] = {
    "JPEG": lambda: encode(ramp(), "JPEG", quality=95),
    "MPO": valid_mpo,
    "PNG": lambda: encode(ramp(), "PNG"),
    "WEBP": lambda: encode(ramp(), "WEBP", lossless=True),
    "TIFF": lambda: encode(ramp(), "TIFF", compression="tiff_deflate"),
    "BMP": lambda: encode(ramp(), "BMP"),
    "GIF": lambda: encode(ramp(), "GIF"),
    "ICO": valid_ico,
    "CUR": valid_cur,
    "QOI": lambda: encode(ramp(), "QOI"),
    "DDS": lambda: encode(ramp("RGBA"), "DDS"),
    "PSD": lambda: psd_declaring(30, 20),
    "TGA": lambda: encode(ramp(), "TGA", compression="tga_rle"),
    "PPM": lambda: ppm_declaring(30, 20),
}

# Per format, a file whose header declares far more pixels than it holds (ICO: a real bomb).
HEADER_BOMBS: dict[str, Callable[[], bytes]] = {
    "JPEG": lambda: jpeg_declaring(60_000, 60_000),
    "MPO": lambda: mpo_declaring(60_000, 60_000),
    "PNG": lambda: png_declaring(*HUGE),
    "WEBP": lambda: webp_canvas_declaring(16_384, 16_384),
    "TIFF": tiff_huge_tile,
    "BMP": lambda: bmp_declaring(*HUGE),
    "GIF": lambda: gif_frame_declaring(60_000, 60_000),
    "ICO": ico_png_bomb,
    "CUR": lambda: cur_declaring(*HUGE),
    "QOI": lambda: qoi_declaring(*HUGE),
    "DDS": lambda: dds_declaring(*HUGE),
    "PSD": lambda: psd_declaring(*HUGE),
    "TGA": lambda: tga_declaring(60_000, 60_000),
    "PPM": lambda: ppm_declaring(*HUGE),
}


# ------------------------------------------------------------------ bytes that once escaped as non-RowErrors


def qoi_index_error() -> bytes:
    """A QOI cut after 50 whole pixels: Pillow's Python QOI decoder reads the next op past the end.

    Noise makes every pixel a 4-byte QOI_OP_RGB after the 14-byte header; a cut between two ops
    gives `IndexError: index out of range` in `image.load()` (a cut inside one gives ValueError).
    """
    noise = np.random.default_rng(3).integers(0, 256, (16, 16, 3), np.uint8)
    return encode(Image.fromarray(noise), "QOI")[: 14 + 4 * 50]


def dds_not_implemented() -> bytes:
    """A DDS whose pixel format says FOURCC 'ZZZZ': Pillow raises NotImplementedError in Image.open."""
    data = bytearray(encode(ramp("RGBA"), "DDS"))
    data[80:88] = struct.pack("<I", 0x4) + b"ZZZZ"  # ddspf.dwFlags = DDPF_FOURCC, ddspf.dwFourCC
    return bytes(data)


def dds_dx10_not_implemented() -> bytes:
    """A DX10 DDS naming DXGI format 2 (R32G32B32A32_FLOAT), which Pillow does not implement."""
    data = bytearray(dds_not_implemented())
    data[84:88] = b"DX10"
    return bytes(data[:128]) + struct.pack("<IIIII", 2, 3, 0, 1, 0) + bytes(data[128:])


# ------------------------------------------------------------------ the table for tests/hostile.py

# id: (maker, code under the default input.image_formats and input.max_pixels <= 10 million)
HOSTILE_IMAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad-qoi-index-error": (qoi_index_error, "unsupported_format"),
    "bad-dds-not-implemented": (dds_not_implemented, "unsupported_format"),
    "bad-dds-dx10-not-implemented": (dds_dx10_not_implemented, "unsupported_format"),
    "bad-ico-png-bomb": (ico_png_bomb, "unsupported_format"),
    "bad-ico-bmp-bomb": (lambda: ico_bmp_declaring(*HUGE), "unsupported_format"),
    "bad-png-huge-ihdr": (lambda: png_declaring(*HUGE), "too_large"),
    "bad-gif-huge-screen": (lambda: gif_declaring(60_000, 60_000), "too_large"),
    "bad-gif-huge-frame": (lambda: gif_frame_declaring(60_000, 60_000), "too_large"),
    "bad-tiff-huge-size": (lambda: tiff_declaring(*HUGE), "too_large"),
    "bad-tiff-huge-tile": (tiff_huge_tile, "too_large"),
    "bad-jpeg-huge-sof": (lambda: jpeg_declaring(60_000, 60_000), "too_large"),
    "bad-bmp-huge-size": (lambda: bmp_declaring(*HUGE), "too_large"),
    "bad-webp-huge-canvas": (lambda: webp_canvas_declaring(16_384, 16_384), "too_large"),
    "bad-webp-huge-vp8l": (lambda: webp_lossless_declaring(16_384, 16_384), "too_large"),
    "bad-jpeg-scan-bomb": (jpeg_scan_bomb, "decode_timeout"),
}

# id: (input.image_formats, code) when the format is allowed, for ids whose answer changes.
ALLOWED_CODES: dict[str, tuple[list[str], str]] = {
    "bad-qoi-index-error": (["QOI"], "corrupt"),
    "bad-dds-not-implemented": (["DDS"], "decode_error"),
    "bad-dds-dx10-not-implemented": (["DDS"], "decode_error"),
    "bad-ico-png-bomb": (["ICO"], "too_large"),
    "bad-ico-bmp-bomb": (["ICO"], "too_large"),
}


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """{id: (bytes, expected code)} under the default input.image_formats."""
    return {row_id: (make(), code) for row_id, (make, code) in HOSTILE_IMAGES.items()}
