"""Unit surface normals <-> painted RGB: ``rgb = round((n + 1) / 2 * 255)`` per axis.

Frames. The painted colours are always in ONE canonical frame, OpenGL camera
coordinates (x right, y up, z toward the viewer), the way Marigold paints
normals: red = x, green = y, blue = z. The `frame` argument names the frame
the *values* are expressed in, on both sides:

- ``encode(n, frame="opencv")`` takes OpenCV vectors (x right, y down,
  z forward, away from the viewer), converts them to OpenGL (flip y and z)
  and paints those;
- ``decode(rgb, frame="opencv")`` reads OpenGL vectors from the colours and
  returns them converted to OpenCV.

So one painting means the same surface whatever frame a caller works in.

Decoding: ``m = rgb / 255 * 2 - 1`` (the raw vector), ``n = m / |m|``.
A painted unit vector has ``|m|`` within ``QUANTISATION_SLACK = sqrt(3)/255``
of 1 (each channel is off by at most half a level); beyond that the colour is
off the unit sphere, and confidence falls as
``exp(-excess**2 / (2 * NORM_SIGMA**2))`` with
``excess = max(||m| - 1| - QUANTISATION_SLACK, 0)``. A raw vector shorter than
``MIN_NORM`` (mid-grey, ~13 levels around (128, 128, 128)) has no direction:
its values are NaN with confidence 0. Round trip: <= 0.4 degrees.

Example:
    >>> import numpy as np
    >>> from vb_batch.codecs import normals
    >>> rgb = normals.encode(np.array([[[0.6, 0.0, 0.8]]]))  # OpenGL: right and toward the viewer
    >>> rgb.tolist()
    [[[204, 128, 230]]]
    >>> print(normals.decode(rgb, frame="opencv").values.round(2))  # same surface, OpenCV axes
    [[[ 0.6 -0.  -0.8]]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vb_batch.codecs import kernels
from vb_batch.codecs.base import Decoded, backend_of, decode_in_chunks, painted_pixels

# Each frame as the signs that take its (x, y, z) to the painted OpenGL frame's;
# the conversion is its own inverse.
FRAMES: dict[str, tuple[int, int, int]] = {
    "opengl": (1, 1, 1),  # x right, y up, z toward the viewer (Marigold; the painted frame)
    "opencv": (1, -1, -1),  # x right, y down, z forward (away from the viewer)
}
PAINTED_FRAME = "opengl"

QUANTISATION_SLACK = math.sqrt(3) / 255
NORM_SIGMA = 0.1
MIN_NORM = 0.1
# The float32 constants of the decode, as numpy's float32 arithmetic rounds the Python floats (`_compiled.normals_unit`).
COMPILED_CONSTANTS = np.array([2.0 / 255.0, MIN_NORM, QUANTISATION_SLACK, -0.5 / NORM_SIGMA**2], np.float32)
# What a NaN or zero-length vector paints: mid-grey, which decodes as "no direction".
NO_DIRECTION_RGB = (128, 128, 128)


def _check_frame(frame: str) -> tuple[int, int, int]:
    if frame not in FRAMES:
        raise ValueError(f"unknown normals frame {frame!r}; known: {sorted(FRAMES)}")
    return FRAMES[frame]


def convert(n: Any, src: str, dst: str) -> Any:
    """Vectors (..., 3) in frame `src` -> the same directions in frame `dst` (numpy or torch)."""
    signs = [a * b for a, b in zip(_check_frame(src), _check_frame(dst))]
    if signs == [1, 1, 1]:
        return n
    backend = backend_of(n)
    if not backend.is_torch:
        n = np.asarray(n)
    return n * backend.asarray(signs, str(n.dtype).removeprefix("torch."))


def encode(n: Any, frame: str = "opengl") -> np.ndarray:
    """Paint normals (..., 3) given in `frame` as uint8 RGB in the OpenGL frame.

    Vectors are normalised first (the colour carries direction only).
    NaN or zero-length vectors paint mid-grey (128, 128, 128), which decodes
    back to NaN with confidence 0.
    """
    n = np.asarray(n, dtype=np.float64)
    if n.shape[-1:] != (3,):
        raise ValueError(f"normals.encode: n has shape {n.shape}; expected (..., 3)")
    n = convert(n, frame, PAINTED_FRAME)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    no_direction = ~(norm > 1e-12)  # also catches NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        rgb = np.rint((n / norm + 1.0) / 2.0 * 255.0)
    rgb = np.where(no_direction, NO_DIRECTION_RGB, rgb)
    return rgb.astype(np.uint8)


def decode(rgb: Any, frame: str = "opengl") -> Decoded:
    """Read unit normals in `frame` back from a painted image.

    Args:
        rgb: uint8 (H, W, 3) or (N, H, W, 3), or float32 in 0..255; numpy or
            torch (decoded in torch on the tensor's device).
        frame: the frame of the returned vectors (colours are always OpenGL).

    Returns:
        Decoded with float32 `values` (..., 3) unit vectors (NaN where the
        colour has no direction) and float32 `confidence` (...) in [0, 1].
    """
    signs = _check_frame(frame)
    backend, pixels, lead_shape = painted_pixels(rgb, "normals")
    xp = backend.xp
    fast = None if backend.is_torch or pixels.dtype != np.uint8 else kernels.active()
    if fast is not None:  # the same float32 operations, compiled, in one pass; numpy's exp for the confidence
        values, exponent = np.empty((len(pixels), 3), np.float32), np.empty(len(pixels), np.float32)
        fast.normals_unit(np.ascontiguousarray(pixels), np.array(signs, np.float32), COMPILED_CONSTANTS, values, exponent)
        confidence = np.exp(exponent, out=exponent)
        return Decoded(values=values.reshape(lead_shape + (3,)), confidence=confidence.reshape(lead_shape))

    def unit_vectors(red: Any, green: Any, blue: Any) -> tuple[Any, ...]:
        raw = [plane * (2.0 / 255.0) - 1.0 for plane in (red, green, blue)]
        length = xp.sqrt(raw[0] ** 2 + raw[1] ** 2 + raw[2] ** 2)
        has_direction = length >= MIN_NORM  # False for NaN too
        scale = xp.where(has_direction, 1.0 / xp.clip(length, MIN_NORM, None), math.nan)
        excess = xp.clip(xp.abs(length - 1.0) - QUANTISATION_SLACK, 0.0, None)
        confidence = xp.where(has_direction, xp.exp(excess**2 * (-0.5 / NORM_SIGMA**2)), 0.0)
        x, y, z = (r * scale if s == 1 else r * (-scale) for r, s in zip(raw, signs))
        return x, y, z, confidence

    x, y, z, confidence = decode_in_chunks(backend, pixels, unit_vectors, elements_per_pixel=12)
    values = xp.stack([x, y, z], axis=-1)
    return Decoded(values=values.reshape(lead_shape + (3,)), confidence=confidence.reshape(lead_shape))
