"""Image bytes -> RGB uint8 (H, W, 3), with EXIF orientation applied and every faulty input a `RowError`.

Unusual but valid images (CMYK, 16-bit, palette, alpha, grey, animated GIF)
are converted, not rejected; broken ones get a short error code.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vb_batch.errors import RowError

# Magic numbers of the formats we read: such bytes that PIL cannot open are a corrupt image, not a non-image.
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")

# We check the pixel count ourselves (per row, with a clear code) before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: PIL's convert("RGB") clips at 255; rescale by the type's range instead.
        grey = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(np.nanmax(grey)) if grey.size else 1.0, 1.0)
        grey8 = np.clip(np.rint(np.nan_to_num(grey) / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def decode_image(data: bytes | None, max_pixels: int, min_side: int = 1) -> np.ndarray:
    """Decode one encoded image to RGB uint8; raise `RowError` with a code for any fault."""
    if data is None:
        raise RowError("null_image", "the image cell is null")
    if len(data) == 0:
        raise RowError("empty", "the image has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RowError(
                    "too_large",
                    f"{width}x{height} = {width * height} pixels exceeds input.max_pixels={max_pixels}",
                )
            if min(width, height) < min_side:
                raise RowError("too_small", f"{width}x{height} is below input.min_side={min_side}")
            image.seek(0)  # first frame of animations
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except RowError:
        raise
    except UnidentifiedImageError:
        if data.startswith(IMAGE_SIGNATURES):
            raise RowError("corrupt", f"image header present but unreadable ({len(data)} bytes)") from None
        raise RowError("not_image", f"not a recognised image format ({len(data)} bytes)") from None
    except OSError as exc:
        text = str(exc)
        truncated = any(w in text.lower() for w in ("truncated", "broken data stream"))
        code = "truncated" if truncated else "corrupt"
        raise RowError(code, text) from None
    except (ValueError, SyntaxError, EOFError, TypeError) as exc:
        raise RowError("corrupt", f"{type(exc).__name__}: {exc}") from None
