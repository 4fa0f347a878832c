"""Image bytes -> RGB uint8 (H, W, 3), with EXIF orientation applied; no bytes can do more than fail their row.

What `decode_image` guarantees, whatever the bytes:

- Row isolation: every fault while identifying, checking or decoding is a `RowError`
  (`empty`, `not_image`, `corrupt`, `truncated`, `too_large`, `too_small`,
  `unsupported_format`, `decode_timeout`, or `decode_error` naming the exception
  type). No message quotes the bytes (a URI may name any file). Only
  KeyboardInterrupt / SystemExit (not `Exception`s) get through.
- A format allowlist (`input.image_formats`): the magic bytes name the format first;
  a known format that is not allowed is refused without any Pillow plugin seeing it,
  and Pillow only ever tries the allowed plugins.
- Bounded work: a progressive JPEG with more scans than `input.max_jpeg_scans` (it
  has about 10; each scan is another pass over the image) is refused before
  decoding, and the bytes are fed to the decoder in chunks (small ones for a progressive
  JPEG), each handed out only while the row's CPU time (`time.thread_time`, so other threads do not count) is
  under `input.decode_timeout_s`: a row that costs more fails with `decode_timeout`
  after at most that budget plus one chunk's and one final pass's work.
- Bounded memory: the pixel count (`input.max_pixels`) is checked on the header before
  any pixel buffer exists, for every format in `DECODABLE_FORMATS`. Where Pillow
  decodes or allocates while opening (ICO decodes its largest icon, WebP allocates its
  canvas) the header is read here first; where the decode buffer is not the image
  (TIFF tiles) that is bounded too. Formats whose size cannot be checked first are
  refused even when listed. Animations and multi-page files give their first frame.

Unusual but valid images (CMYK, 16-bit, palette, alpha, grey, animated GIF) are
converted, not rejected.

Reduced decoding (`decode_for_model`): when the model works far below the input's
size, a JPEG is decoded by libjpeg's DCT scaling (Pillow's draft mode) at 1/2, 1/4
or 1/8 of its size, never below the size the caller says it needs; the full
upright size is still reported, so the outputs map back onto the whole image.
Other formats decode at full size.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import (
    BmpImagePlugin,
    IcoImagePlugin,
    Image,
    ImageOps,
    PngImagePlugin,
    UnidentifiedImageError,
)

from vb_batch.config import DECODABLE_IMAGE_FORMATS, DEFAULT_IMAGE_FORMATS, InputConfig
from vb_batch.errors import RowError

# We check the pixel count ourselves (per row, with a clear code) before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
# Register every plugin now: Pillow's lazy registration is not safe under concurrent first decodes.
Image.init()

DEFAULT_FORMATS: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
DEFAULT_DECODE_TIMEOUT_S: float = InputConfig.model_fields["decode_timeout_s"].default
DEFAULT_MAX_JPEG_SCANS: int = InputConfig.model_fields["max_jpeg_scans"].default
# Bytes a progressive JPEG's decoder gets between two checks of the row's CPU time (other images:
# Pillow's 64 KiB). It absorbs each scan as its bytes arrive, so a scan bomb spends its time chunk
# by chunk, where it can be stopped; at most one chunk's scans run past the budget.
DECODE_CHUNK_BYTES = 4096

# Formats whose pixel count is known (and checked here) before Pillow allocates a pixel buffer:
# their plugins read only headers on open, or `_HEADER_SIZES` reads the size first (a header bomb
# per format in tests/hostile_images.py; its peak memory is measured in tests/test_decode_fuzz.py).
# A listed format outside this set is refused per row (ICNS: its icons decode at their own PNG's
# size, not the one checked; EPS runs Ghostscript; the others are not measured).
DECODABLE_FORMATS = DECODABLE_IMAGE_FORMATS

# Magic bytes -> format name (Pillow's where it has one). The first match names the format, so a
# refused format is named in the error and never reaches a Pillow plugin, and an allowed one is
# opened by its own plugin only. Byte orders Pillow's TIFF plugin also accepts are listed.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"MM*\x00", "TIFF"),
    (b"II\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"8BPS", "PSD"),
    (b"icns", "ICNS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"\x01\xda", "SGI"),
    (b"\x59\xa6\x6a\x95", "SUN"),
    (b"BLP1", "BLP"),
    (b"BLP2", "BLP"),
    (b"FTEX", "FTEX"),
    (b"\xb1\x68\xde\x3a", "DCX"),
    (b"\xd7\xcd\xc6\x9a", "WMF"),
    (b"SIMPLE  =", "FITS"),
    (b"/* XPM */", "XPM"),
    (b"DanM", "MSP"),
    (b"LinS", "MSP"),
)
_ICON_MAGIC = {b"\x00\x00\x01\x00": "ICO", b"\x00\x00\x02\x00": "CUR"}
_ISO_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"hevc": "HEIF", b"mif1": "HEIF"}
_SIGNED_FORMATS = frozenset(
    {name for _, name in _SIGNATURES} | {"MPO", "WEBP", "PPM", "PCX", *_ICON_MAGIC.values(), *_ISO_BRANDS.values()}
)
# MPO is a JPEG with an index of further frames: Pillow's JPEG plugin opens both, as the one it is.
_PLUGIN = {"MPO": "JPEG"}


def sniff_format(data: bytes) -> str | None:
    """The format named by the first bytes of `data`, or None when no known magic matches."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    # An uncompressed TGA starts 00 00 01|02 00 too; there the icon count is its colour-map length, 0.
    icon = _ICON_MAGIC.get(data[:4])
    if icon and int.from_bytes(data[4:6], "little") > 0:
        return icon
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_BRANDS:
        return _ISO_BRANDS[data[8:12]]
    if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"f", b"F") and data[2:3].isspace():
        return "PPM"
    if data[:1] == b"\x0a" and data[1:2] in (b"\x00", b"\x02", b"\x03", b"\x05") and data[2:3] == b"\x01":
        return "PCX"
    return None


# ---------------------------------------------------------------- sizes read before Pillow opens


def _webp_canvas(data: bytes) -> tuple[int, int]:
    """The canvas that libwebp's animation decoder allocates (twice, 4 bytes a pixel) on open."""
    if len(data) < 30:
        raise RowError("truncated", f"the WebP header is cut short ({len(data)} bytes)")
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    raise RowError("corrupt", f"the WebP's first chunk is {chunk!r}, not VP8, VP8L or VP8X")


def _ico_image(data: bytes) -> tuple[int, int]:
    """The real size of the icon that Pillow's ICO plugin decodes inside `Image.open`.

    The directory's 1-byte sizes say nothing: the icon's own PNG or BMP header does. Pillow's
    IcoFile reads only the directory and picks the icon as IcoImageFile does; opening that icon
    with the lazy plugin IcoFile.frame uses reads only its header, the way Pillow will. (Only
    that icon: reading every icon's PNG to its first IDAT costs icons x chunks, a CPU bomb.)
    """
    icons = IcoImagePlugin.IcoFile(io.BytesIO(data))
    if not icons.entry:
        raise RowError("corrupt", "the ICO directory lists no images")
    offset = icons.entry[icons.getentryindex(icons.entry[0].dim)].offset
    stream = io.BytesIO(data)
    stream.seek(offset)
    is_png = data[offset : offset + 8] == PngImagePlugin._MAGIC
    return (PngImagePlugin.PngImageFile if is_png else BmpImagePlugin.DibImageFile)(stream).size


# Formats whose Pillow plugin decodes or allocates on open: what it would allocate, read here first.
_HEADER_SIZES: dict[str, tuple[Callable[[bytes], tuple[int, int]], str]] = {
    "WEBP": (_webp_canvas, "the WebP canvas"),
    "ICO": (_ico_image, "the icon Pillow would decode"),
}


# ---------------------------------------------------------------- checks


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str = "the image") -> None:
    width, height = size
    if width * height > max_pixels:
        raise RowError(
            "too_large",
            f"{what} is {width}x{height} = {width * height} pixels, above input.max_pixels={max_pixels}; "
            "raise input.max_pixels to decode it",
        )


def _check_tiles(image: Image.Image, max_pixels: int) -> None:
    """libtiff sizes its decode buffer by the tile, not the image: a 64x64 TIFF can ask for gigabytes."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 322 in tags and 323 in tags:  # TileWidth, TileLength
        _check_pixels((int(tags[322]), int(tags[323])), max_pixels, what="each TIFF tile")


def _listed_formats(formats: Iterable[str] | None) -> tuple[str, ...]:
    """Upper-cased `input.image_formats` (default: InputConfig's), in the user's order."""
    return tuple(str(name).upper() for name in (DEFAULT_FORMATS if formats is None else formats))


def _unsupported(name: str, listed: Sequence[str]) -> RowError:
    if name in listed:
        return RowError(
            "unsupported_format",
            f"{name} is in input.image_formats but its size cannot be checked before decoding; "
            f"vb_batch decodes only {sorted(DECODABLE_FORMATS)}",
        )
    return RowError(
        "unsupported_format",
        f"the bytes are an image in format {name}, which is not in input.image_formats={list(listed)}; "
        "add it there to decode such images",
    )


# ---------------------------------------------------------------- decoding


class _BudgetedBytes(io.BytesIO):
    """The encoded image as a decoder reads it: no more bytes once the row's CPU time is spent."""

    def __init__(self, data: bytes, seconds: float):
        super().__init__(data)
        self.seconds = seconds
        self.started = time.thread_time()

    def check(self) -> None:
        spent = time.thread_time() - self.started
        if spent > self.seconds:
            raise RowError("decode_timeout", f"decoding took {spent:.1f} s of CPU time, over "
                           f"input.decode_timeout_s={self.seconds:g}")

    def read(self, size: int | None = -1) -> bytes:
        self.check()
        return super().read(size)


def _check_scans(data: bytes, max_scans: int) -> None:
    """Refuse a JPEG with more start-of-scan markers than `max_scans`, before any decoding.

    Entropy-coded data stuffs every 0xFF with 0x00, so 0xFFDA appears only as a marker (or
    inside an embedded thumbnail, which counts its own few scans).
    """
    # numpy, not bytes.count or find: 0xFF is frequent in JPEG data, which makes those ~20x slower.
    octets = np.frombuffer(data, np.uint8)
    scans = int(np.count_nonzero(octets[np.flatnonzero(octets[1:] == 0xDA)] == 0xFF))
    if scans > max_scans:
        raise RowError("decode_timeout", f"the JPEG has {scans} scans, more than input.max_jpeg_scans={max_scans} "
                       "(a progressive JPEG has about 10); refused before decoding")


def _upright(image: Image.Image) -> Image.Image:
    # exif_transpose copies the whole image when there is nothing to do: only call it when there is.
    orientation = image.getexif().get(0x0112, 1)
    return ImageOps.exif_transpose(image) if orientation in (2, 3, 4, 5, 6, 7, 8) else image


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: PIL's convert("RGB") clips at 255; rescale by the type's range instead.
        grey = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") else max(float(np.nanmax(grey)) if grey.size else 1.0, 1.0)
        grey8 = np.clip(np.rint(np.nan_to_num(grey) / np.float32(top) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as exc:
            raise RowError("decode_error", f"{image.mode} pixels cannot be converted to RGB ({exc})") from None
    return np.asarray(image)


# (height, width) of the upright image -> the smallest (height, width) the caller can use.
NeededSize = Callable[[int, int], tuple[int, int]]
# libjpeg scales the DCT by 1/2, 1/4 or 1/8 while decoding (MPO: a JPEG with more frames).
_DRAFT_FORMATS = ("JPEG", "MPO")
# EXIF orientations that swap width and height (transpose, rotate 90, transverse, rotate 270).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded for the model: its RGB pixels (maybe reduced) and the full upright image's size."""

    pixels: np.ndarray  # RGB uint8 (h, w, 3), upright
    size: tuple[int, int]  # (height, width) of the whole upright image: the grid outputs map back to

    @property
    def reduced(self) -> bool:
        return self.pixels.shape[:2] != self.size


def _draft(image: Image.Image, needed: NeededSize | None) -> tuple[int, int] | None:
    """Ask a JPEG decoder for the smallest DCT scale that still gives `needed`; the full upright (h, w) if it did."""
    if needed is None or image.format not in _DRAFT_FORMATS:
        return None
    width, height = image.size
    swapped = image.getexif().get(0x0112, 1) in _SWAPPING_ORIENTATIONS
    upright = (width, height) if swapped else (height, width)
    need_h, need_w = needed(*upright)
    request = (need_h, need_w) if swapped else (need_w, need_h)  # raw (width, height), as Pillow counts
    if request[0] * 2 > width or request[1] * 2 > height:
        return None  # not even half the size: nothing to gain
    # Pillow picks the largest scale whose (rounded up) size is still >= the request on both sides.
    image.draft(None, request)  # None: keep the mode; only the scale changes
    return upright


def _decode(
    data: bytes, max_pixels: int, min_side: int, listed: tuple[str, ...], needed: NeededSize | None,
    timeout_s: float, max_jpeg_scans: int,
) -> DecodedImage:
    allowed = [name for name in listed if name in DECODABLE_FORMATS]
    name = sniff_format(data)
    if name is not None and name not in {_PLUGIN.get(f, f) for f in allowed}:
        raise _unsupported(name, listed)
    # Bytes without any known magic can only be a format that has none (TGA): never the others.
    plugins = [name] if name else [f for f in allowed if f not in _SIGNED_FORMATS and f in Image.OPEN]
    if not plugins:
        # Its bytes are not quoted: a URI may name any file (a config, a key), and messages reach logs and outputs.
        raise RowError("not_image", f"not a recognised image format ({len(data)} bytes, no known image signature)")
    if name not in (None, *Image.OPEN):
        raise RowError("unsupported_format", f"this Pillow build cannot read {name} (its library is missing)")
    if name in _HEADER_SIZES:
        read_size, what = _HEADER_SIZES[name]
        _check_pixels(read_size(data), max_pixels, what)
    source = _BudgetedBytes(data, timeout_s)
    try:
        image = Image.open(source, formats=plugins)
    except UnidentifiedImageError:
        if name:
            raise RowError("corrupt", f"{name} header present but unreadable ({len(data)} bytes)") from None
        raise RowError("not_image", f"not a recognised image format ({len(data)} bytes)") from None
    with image:
        if image.format not in allowed:  # a JPEG with an MPO index opens as MPO, and the reverse
            raise _unsupported(str(image.format), listed)
        width, height = image.size
        _check_pixels((width, height), max_pixels)
        if min(width, height) < min_side:
            raise RowError("too_small", f"{width}x{height} is below input.min_side={min_side}")
        _check_tiles(image, max_pixels)
        drafted = _draft(image, needed)
        if image.format in _DRAFT_FORMATS and (image.info.get("progressive") or image.info.get("progression")):
            # Only a progressive JPEG makes passes over the image per scan (a baseline one with extra
            # scans fails at once); Pillow has read its header only.
            _check_scans(data, max_jpeg_scans)
            image.decodermaxblock = DECODE_CHUNK_BYTES
        image.load()  # the frame it opened on: the first of an animation or a multi-page file
        source.check()  # the work after the last chunk (a progressive JPEG's output pass) counts too
        _check_pixels(image.size, max_pixels)  # no plugin may grow the image while decoding
        pixels = _to_rgb(_upright(image))
        return DecodedImage(pixels, drafted or pixels.shape[:2])


# Exception types Pillow and its C decoders raise on malformed bytes (beyond OSError).
_MALFORMED = (ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError, struct.error, zlib.error)


def _row_error(exc: Exception) -> RowError:
    """The row's error for an exception raised while decoding it; one row's fault, never the job's."""
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        return RowError("too_large", f"decoding ran out of memory ({what}); lower input.max_pixels or add memory")
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return RowError("too_large", what)
    if isinstance(exc, OSError):
        truncated = any(word in str(exc).lower() for word in ("truncated", "broken data stream"))
        return RowError("truncated" if truncated else "corrupt", str(exc) or type(exc).__name__)
    if isinstance(exc, _MALFORMED):
        return RowError("corrupt", what)
    return RowError("decode_error", what)


def decode_image(
    data: bytes | None,
    max_pixels: int,
    min_side: int = 1,
    formats: Iterable[str] | None = None,
    max_bytes: int | None = None,
    *,
    timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> np.ndarray:
    """Decode one encoded image to RGB uint8; raise `RowError` with a code for any fault.

    `formats` is `input.image_formats` (default: InputConfig's list); `max_bytes` is
    `input.max_bytes` (default: no limit, for callers whose bytes are already bounded);
    `timeout_s` and `max_jpeg_scans` are `input.decode_timeout_s` and `input.max_jpeg_scans`.

    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (30, 20)).save(buf, "PNG")
    >>> decode_image(buf.getvalue(), max_pixels=1_000_000).shape
    (20, 30, 3)
    """
    return decode_for_model(data, max_pixels, min_side, formats, max_bytes, timeout_s=timeout_s,
                            max_jpeg_scans=max_jpeg_scans).pixels


def decode_for_model(
    data: bytes | None,
    max_pixels: int,
    min_side: int = 1,
    formats: Iterable[str] | None = None,
    max_bytes: int | None = None,
    needed: NeededSize | None = None,
    *,
    timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> DecodedImage:
    """`decode_image`, reduced where the format allows to no less than `needed(height, width)`.

    All checks (`max_pixels`, `min_side`, formats) apply to the full image. A JPEG is
    decoded at the smallest DCT scale (1, 1/2, 1/4 or 1/8) whose size is still at
    least `needed` on both sides; `needed=None` (or any other format) decodes in full.

    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (800, 600)).save(buf, "JPEG")
    >>> image = decode_for_model(buf.getvalue(), 10**6, needed=lambda h, w: (150, 200))
    >>> image.pixels.shape, image.size
    ((150, 200, 3), (600, 800))
    """
    if data is None:
        raise RowError("null_image", "the image cell is null")
    if len(data) == 0:
        raise RowError("empty", "the image has zero bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise RowError("too_large", f"{len(data)} bytes exceeds input.max_bytes={max_bytes}")
    try:
        return _decode(bytes(data), max_pixels, min_side, _listed_formats(formats), needed, timeout_s, max_jpeg_scans)
    except RowError:
        raise
    except Exception as exc:  # noqa: BLE001 - any fault of these bytes is this row's; KeyboardInterrupt is not caught
        raise _row_error(exc) from None
