"""Storage encodings for decoded maps (numpy <-> png or array cells); `vb_batch.io.outputs.load_arrays` reads them back.

Two encodings, both plain Parquet types that Delta, Iceberg, Spark, DuckDB and
Hugging Face datasets read (Arrow extension tensor types break several of them):

* ``png``: lossless PNG bytes (binary column).
  - depth: 16-bit grey, ``value = offset + round(depth * scale)``; 0 = invalid
    (NaN), 65535 = far (+inf, or beyond the largest representable depth).
    Metric depth uses KITTI's convention (scale 256 per metre, offset 0,
    resolution 3.9 mm, finite up to 255.99 m); relative depth in [0, 1] uses
    scale 65533, offset 1.
  - normals: RGB8 through the normals codec (colours in the canonical OpenGL
    frame, as painted); (0, 0, 0) = invalid, which no unit vector encodes to.
  - classes: 8-bit grey (16-bit for legends over 255 classes); the legend's
    ``unlabelled`` id marks unlabelled pixels.
  - mask: 8-bit grey, 1 = the referred object, 0 = elsewhere.
* ``array``: ``struct<shape: list<int32>, dtype: string, data: binary>`` with
  the raw little-endian values (float32 metres / unit vectors, integer ids).

What a stored number means (unit, scale, offset, frame, legend) is written in
the column's field metadata under ``vb.*`` keys, and `load_arrays` (io.outputs) reads it
from there, so a reader never needs the job config.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from vb_batch.codecs import normals as normals_codec

ARRAY_TYPE = pa.struct(
    [pa.field("shape", pa.list_(pa.int32())), pa.field("dtype", pa.string()), pa.field("data", pa.binary())]
)
PNG_INVALID = 0
PNG_FAR = 65535
# zlib level 1 (`output.png_compression`'s default): several times faster than 6 for a few percent more bytes.
PNG_COMPRESS_LEVEL = 1

KINDS = ("depth", "normals", "classes", "mask")


@dataclass(frozen=True)
class ColumnMeta:
    """What one stored map column means; serialised as field metadata."""

    kind: str  # one of KINDS
    encoding: str  # "png" | "array"
    unit: str
    task: str
    scale: float | None = None
    offset: float | None = None
    frame: str | None = None
    legend: list[tuple[str, tuple[int, int, int]]] | None = None
    unlabelled: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[bytes, bytes]:
        meta = {"kind": self.kind, "encoding": self.encoding, "unit": self.unit, "task": self.task}
        if self.scale is not None:
            meta["scale"] = repr(float(self.scale))
        if self.offset is not None:
            meta["offset"] = repr(float(self.offset))
        if self.kind == "depth" and self.encoding == "png":
            meta["invalid"] = str(PNG_INVALID)
            meta["far"] = str(PNG_FAR)
        if self.frame is not None:
            meta["frame"] = self.frame
        if self.legend is not None:
            meta["legend"] = json.dumps([[n, list(c)] for n, c in self.legend])
        if self.unlabelled is not None:
            meta["unlabelled"] = str(self.unlabelled)
        meta.update(self.extra)
        return {f"vb.{k}".encode(): v.encode() for k, v in meta.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> "ColumnMeta":
        meta = {k.decode(): v.decode() for k, v in (metadata or {}).items() if k.startswith(b"vb.")}
        meta = {k[3:]: v for k, v in meta.items()}
        if "kind" not in meta:
            raise ValueError("column has no vb.kind field metadata: it was not written by vb_batch")
        legend = meta.pop("legend", None)
        known = {"kind", "encoding", "unit", "task", "scale", "offset", "frame", "unlabelled"}
        return cls(
            kind=meta["kind"],
            encoding=meta["encoding"],
            unit=meta.get("unit", ""),
            task=meta.get("task", ""),
            scale=float(meta["scale"]) if "scale" in meta else None,
            offset=float(meta["offset"]) if "offset" in meta else None,
            frame=meta.get("frame"),
            legend=[(n, tuple(c)) for n, c in json.loads(legend)] if legend else None,
            unlabelled=int(meta["unlabelled"]) if "unlabelled" in meta else None,
            extra={k: v for k, v in meta.items() if k not in known and k not in ("invalid", "far")},
        )


def depth_png_params(relative: bool) -> tuple[float, float]:
    """(scale, offset) of the 16-bit depth PNG: KITTI's metres*256 for metric, [0, 1] spread for relative."""
    return (65533.0, 1.0) if relative else (256.0, 0.0)


# ---------------------------------------------------------------------------- encode


def png_bytes(image: Image.Image, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Lossless PNG of a Pillow image: grey 8 / 16-bit and RGB through `png_of_array`, other modes through Pillow."""
    if image.mode in ("L", "I;16", "RGB"):
        return png_of_array(np.asarray(image), compress_level)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def png_of_array(pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """A uint8 (H, W) or (H, W, 3), or uint16 (H, W), array as PNG bytes: every row "Up"-filtered, then zlib.

    Why not Pillow's encoder: it picks a filter per row by trying all five, which costs more than
    compressing (at 12 MP, 0.42 s of 0.51 s for a depth map); one vectorised Up filter (the
    difference to the row above, which suits smooth, resized maps) and stdlib zlib take half the
    time for a file of about the same size, and zlib releases the GIL, so rows encode in parallel.
    """
    if pixels.dtype == np.uint16 and pixels.ndim == 2:
        data, bit_depth, colour_type = pixels.astype(">u2").view(np.uint8), 16, 0
    elif pixels.dtype == np.uint8 and (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        data, bit_depth, colour_type = pixels, 8, 0 if pixels.ndim == 2 else 2
    else:
        raise ValueError(f"png_of_array: {pixels.dtype} of shape {pixels.shape}: expected uint8 grey or RGB, uint16 grey")
    height, width = pixels.shape[:2]
    rows = data.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # PNG filter type 2, "Up": each byte minus the byte above it, modulo 256
    filtered[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    compressed = zlib.compress(filtered, compress_level)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    # IDAT chunks hold at most 2**31 - 1 bytes each.
    idat = [_png_chunk(b"IDAT", compressed[i : i + 2**30]) for i in range(0, max(len(compressed), 1), 2**30)]
    return b"".join([b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), *idat, _png_chunk(b"IEND", b"")])


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _depth_to_png(depth: np.ndarray, meta: ColumnMeta, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    d = np.asarray(depth)
    # float64 codes (exact rounding); in place: at 12 MP each temporary costs as much as the PNG.
    stored = np.multiply(d, meta.scale, dtype=np.float64)
    stored += meta.offset
    np.rint(stored, out=stored)
    with np.errstate(invalid="ignore"):
        # Depth that rounds below the first code is still a real measurement: keep it at code 1.
        np.clip(stored, 1, PNG_FAR, out=stored)  # +inf (far) lands on PNG_FAR here
    stored[np.isnan(stored)] = PNG_INVALID
    return png_of_array(stored.astype(np.uint16), level)


def _png_to_depth(data: bytes, meta: ColumnMeta) -> np.ndarray:
    stored = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32)
    depth = (stored - np.float32(meta.offset)) / np.float32(meta.scale)
    depth[stored == PNG_INVALID] = np.nan
    depth[stored == PNG_FAR] = np.inf
    return depth


def _normals_to_png(n: np.ndarray, meta: ColumnMeta, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """`normals_codec.encode` in float32 (within 1 code of its float64 colours; ~5x faster at 12 MP)."""
    vectors = normals_codec.convert(np.asarray(n, dtype=np.float32), meta.frame or "opengl", normals_codec.PAINTED_FRAME)
    squared = np.einsum("...c,...c->...", vectors, vectors)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scaled = vectors * (np.float32(127.5) / np.sqrt(squared))[..., None]
    # OpenCV's saturating round of 127.5 * n / |n| + 127.5 to uint8 in one SIMD pass (numpy takes five).
    colours = cv2.convertScaleAbs(scaled, alpha=1.0, beta=127.5)
    invalid = ~np.isfinite(squared)  # a NaN or infinite component: stored as (0, 0, 0), which no unit vector encodes to
    no_direction = squared <= 1e-24  # zero length: the codec's mid-grey
    if no_direction.any():
        colours[no_direction] = normals_codec.NO_DIRECTION_RGB
    if invalid.any():
        colours[invalid] = 0
    return png_of_array(colours, level)


def _png_to_normals(data: bytes, meta: ColumnMeta) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    n = np.array(normals_codec.decode(rgb, frame=meta.frame).values, dtype=np.float32)
    n[(rgb == 0).all(axis=-1)] = np.nan
    return n


def _ids_dtype(meta: ColumnMeta) -> type:
    return np.uint16 if meta.unlabelled is not None and meta.unlabelled > 255 else np.uint8


def _ids_to_png(ids: np.ndarray, meta: ColumnMeta, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    return png_of_array(np.ascontiguousarray(ids, dtype=_ids_dtype(meta)), level)


def _png_to_ids(data: bytes, meta: ColumnMeta) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(_ids_dtype(meta))


def encode_array(values: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(values)
    little = arr.dtype.newbyteorder("<")
    return {"shape": list(arr.shape), "dtype": little.str, "data": arr.astype(little, copy=False).tobytes()}


def decode_array(cell: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(cell["data"], dtype=np.dtype(cell["dtype"])).reshape(cell["shape"])


# A binary column's offsets are int32: past this many bytes, cells go through pyarrow's own builder.
_MAX_BINARY_BYTES = 2**31 - 1


def arrays_to_column(arrays: list[np.ndarray | None]) -> pa.Array:
    """numpy arrays (None: a null cell) as one `ARRAY_TYPE` column, equal to encoding them cell by cell.

    The values are copied once, into the column's data buffer: no Python bytes or dict per cell
    (at 768 px that halves what the model thread spends storing a batch's answers).
    """
    present = []
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            present.append(a.astype(a.dtype.newbyteorder("<"), copy=False))
    sizes = np.array([a.nbytes for a in present], dtype=np.int64)
    if sizes.sum() > _MAX_BINARY_BYTES:
        return pa.array([None if a is None else encode_array(a) for a in arrays], type=ARRAY_TYPE)
    lengths = np.zeros(len(arrays), dtype=np.int64)
    lengths[[i for i, a in enumerate(arrays) if a is not None]] = sizes
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    data = np.concatenate([a.reshape(-1).view(np.uint8) for a in present]) if present else np.empty(0, np.uint8)
    cells = iter(present)
    described = [None if a is None else next(cells) for a in arrays]
    shape = pa.array([None if a is None else list(a.shape) for a in described], ARRAY_TYPE.field("shape").type)
    dtype = pa.array([None if a is None else a.dtype.str for a in described], pa.string())
    nulls = np.array([a is None for a in arrays], dtype=bool)
    # Null cells are empty in the data child; the struct's own validity marks them.
    values = pa.BinaryArray.from_buffers(pa.binary(), len(arrays), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return pa.StructArray.from_arrays(
        [shape, dtype, values], fields=list(ARRAY_TYPE), mask=pa.array(nulls) if nulls.any() else None
    )


def column_to_arrays(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray | None]:
    """An `ARRAY_TYPE` column as numpy arrays that view its data buffer (read-only, no copy per cell)."""
    if isinstance(column, pa.ChunkedArray):
        return [a for chunk in column.chunks for a in column_to_arrays(chunk)]
    if len(column) == 0:  # pyarrow may give an empty binary array no offsets buffer
        return []
    shapes, dtypes, values = column.flatten()
    shape_list, dtype_list = shapes.to_pylist(), dtypes.to_pylist()
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
    data.flags.writeable = False  # the column's own memory: a backend must not change its input in place
    out: list[np.ndarray | None] = []
    for i in range(len(column)):
        if nulls[i]:
            out.append(None)
            continue
        array = data[offsets[i] : offsets[i + 1]].view(np.dtype(dtype_list[i])).reshape(shape_list[i])
        if not array.flags.aligned:  # after cells of odd sizes: numpy copes, torch and BLAS may not
            array = array.copy()
            array.flags.writeable = False
        out.append(array)
    return out


def encode_map(values: np.ndarray, meta: ColumnMeta, png_compression: int = PNG_COMPRESS_LEVEL) -> Any:
    """One decoded map -> the Python value of its storage cell (bytes or an array struct).

    `png_compression` is zlib's level (0-9, `output.png_compression`); any level decodes the same.
    """
    if meta.encoding == "array":
        dtype = {"depth": np.float32, "normals": np.float32}.get(meta.kind)
        return encode_array(values.astype(dtype, copy=False) if dtype else values)
    if meta.kind == "depth":
        return _depth_to_png(values, meta, png_compression)
    if meta.kind == "normals":
        return _normals_to_png(values, meta, png_compression)
    return _ids_to_png(values, meta, png_compression)


def decode_map(cell: Any, meta: ColumnMeta) -> np.ndarray:
    """Inverse of `encode_map`: real units (metres, unit vectors, class ids)."""
    if meta.encoding == "array":
        return decode_array(cell)
    if meta.kind == "depth":
        return _png_to_depth(cell, meta)
    if meta.kind == "normals":
        return _png_to_normals(cell, meta)
    return _png_to_ids(cell, meta)


def storage_type(encoding: str) -> pa.DataType:
    return ARRAY_TYPE if encoding == "array" else pa.binary()
