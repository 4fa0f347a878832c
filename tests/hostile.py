"""A hostile image table: every kind of broken row mixed with good and unusual-but-valid ones.

The same table feeds the local, Ray and Spark engines (tests/test_engine_contract.py,
test_ray.py, test_spark.py): every input id must come out exactly once, good rows
with outputs, bad rows with the right error code.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hostile_images import ALLOWED_CODES, HOSTILE_IMAGES
from hostile_uris import hostile_uri_input, hostile_uri_rows

from vb_batch.codecs import depth
from vb_batch.config import DEFAULT_IMAGE_FORMATS

# A file that is not an image and whose first bytes must never reach a message, a log or an output.
SECRET_TEXT = b"root:x:0:0:root:/root:/bin/bash\n[default]\naws_secret_access_key = hostile-table-secret\n"
RAMP = depth.encode(np.linspace(1, 30, 24 * 32, dtype=np.float32).reshape(24, 32))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise_png() -> bytes:
    return _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")


def _bomb_png() -> bytes:
    """20000 x 20000 one-bit pixels in a few kilobytes: a decompression bomb."""
    return _encode(Image.new("1", (20000, 20000)), "PNG")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(RAMP).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(RAMP), Image.fromarray(255 - RAMP)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _palette_with_transparency() -> bytes:
    image = Image.fromarray(RAMP).quantize(64)
    image.info["transparency"] = 0
    return _encode(image, "PNG", transparency=0)


# Valid images: (id, bytes). All decode to 24 x 32 RGB.
VALID = {
    "ok-png": lambda: _encode(Image.fromarray(RAMP), "PNG"),
    "ok-jpeg": lambda: _encode(Image.fromarray(RAMP), "JPEG", quality=95),
    "ok-cmyk-jpeg": lambda: _encode(Image.fromarray(RAMP).convert("CMYK"), "JPEG", quality=95),
    "ok-grey16-png": lambda: _encode(Image.fromarray(RAMP[..., 0].astype(np.uint16) * 257), "PNG"),
    "ok-palette-transparent": _palette_with_transparency,
    "ok-rgba-png": lambda: _encode(Image.fromarray(RAMP).convert("RGBA"), "PNG"),
    "ok-grey-png": lambda: _encode(Image.fromarray(RAMP).convert("L"), "PNG"),
    "ok-exif-rotated": _exif_rotated,
    "ok-animated-gif": _animated_gif,
    "ok-webp": lambda: _encode(Image.fromarray(RAMP), "WEBP", lossless=True),
    "ok-tiff": lambda: _encode(Image.fromarray(RAMP), "TIFF"),
}

# Faulty files: (id, bytes, expected code).
BROKEN_FILES = {
    "bad-empty": (lambda: b"", "empty"),
    "bad-text": (lambda: b"<html>not an image</html>", "not_image"),
    "bad-secret-text": (lambda: SECRET_TEXT, "not_image"),  # a URI may name any file: its bytes stay out
    "bad-png-garbage": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt"),
    "bad-truncated-png": (lambda: _noise_png()[:2000], "truncated"),
    "bad-truncated-jpeg": (
        lambda: _encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")[:900],
        "truncated",
    ),
    "bad-bomb": (_bomb_png, "too_large"),
    "bad-too-small": (lambda: _encode(Image.new("RGB", (3, 2)), "PNG"), "too_small"),
    "bad-gif-garbage": (lambda: b"GIF89a" + b"\xff" * 50, "corrupt"),
}


def write_hostile_table(folder: Path, server=None) -> tuple[Path, dict[str, str | None]]:
    """Files under `folder/images`, and `folder/hostile.parquet` with a URI column naming them.

    With a `hostile_uris.HostileServer`, the table also holds its rows: malformed URIs,
    redirects out of the allowed places, bodies over `input.max_bytes`, a stalling server,
    a FIFO, /dev/zero. One id is delivered twice (the second time naming a text file): under
    `hostile_job`'s `input.duplicate_ids: first` only its first row is labelled. Returns the
    table's path and {id: expected error code or None}.
    """
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str | None]] = []
    expected: dict[str, str | None] = {}
    for row_id, make in VALID.items():
        path = images / f"{row_id}.img"
        path.write_bytes(make())
        rows.append((row_id, str(path)))
        expected[row_id] = None
    for row_id, (make, code) in {**BROKEN_FILES, **HOSTILE_IMAGES}.items():
        path = images / f"{row_id}.img"
        path.write_bytes(make())
        rows.append((row_id, str(path)))
        # The job allows the formats whose Pillow decoders raise odd exceptions, to prove the row guard.
        expected[row_id] = ALLOWED_CODES[row_id][1] if row_id in ALLOWED_CODES else code
    (images / "a-directory.jpg").mkdir(exist_ok=True)
    outside = folder / "outside.png"
    outside.write_bytes(_encode(Image.fromarray(RAMP), "PNG"))
    os.symlink(outside, images / "link-outside.png") if not (images / "link-outside.png").exists() else None
    uri_faults = {
        "bad-missing": (str(images / "no-such-file.png"), "not_found"),
        "bad-directory": (str(images / "a-directory.jpg"), "is_a_directory"),
        "bad-null-uri": (None, "null_uri"),
        "bad-dotdot": (str(images / ".." / "outside.png"), "uri_not_allowed"),
        "bad-symlink-out": (str(images / "link-outside.png"), "uri_not_allowed"),
        "bad-metadata-service": ("http://169.254.169.254/latest/meta-data/iam", "uri_not_allowed"),
        "bad-other-scheme": ("s3://somebody-elses-bucket/x.png", "uri_not_allowed"),
    }
    if server is not None:
        uri_faults.update(hostile_uri_rows(images, server))
    for row_id, (uri, code) in uri_faults.items():
        rows.append((row_id, uri))
        expected[row_id] = code
    # A re-delivered id (input.duplicate_ids: first): sorted after the original, so its text file is skipped.
    (images / "ok-png.zz-redelivered.img").write_bytes(SECRET_TEXT)
    rows.append(("ok-png", str(images / "ok-png.zz-redelivered.img")))
    rows.sort()
    table = pa.table({"id": [r[0] for r in rows], "uri": pa.array([r[1] for r in rows], pa.string())})
    path = folder / "hostile.parquet"
    pq.write_table(table, path, row_group_size=7)
    return path, expected


# Formats allowed beyond the defaults: their Pillow decoders raise IndexError / NotImplementedError on
# some bytes, or decode on open (ICO): the rows must still end as row errors.
EXTRA_FORMATS = sorted({fmt for formats, _ in ALLOWED_CODES.values() for fmt in formats})


def hostile_job(table: Path, out: Path, engine: str, server=None) -> dict:
    inputs = {
        "path": str(table),
        "uri_column": "uri",
        "max_pixels": 10_000_000,
        "min_side": 8,
        "allowed_prefixes": [str(table.parent / "images")],
        "image_formats": [*DEFAULT_IMAGE_FORMATS, *EXTRA_FORMATS],
        "duplicate_ids": "first",
    }
    if server is not None:
        inputs.update(hostile_uri_input(table.parent / "images", server))
    return {
        "input": inputs,
        "output": {"path": str(out), "mode": "overwrite", "rows_per_file": 8},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 4},
        "engine": {"kind": engine},
        "run": {"progress": False, "max_error_fraction": 1.0},
    }


def check_hostile_output(table: pa.Table, expected: dict[str, str | None]) -> None:
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected), "every input id exactly once"
    errors = dict(zip(ids, table.column("vb_error").to_pylist()))
    depths = dict(zip(ids, table.column("depth").to_pylist()))
    for row_id, code in expected.items():
        got = errors[row_id] and errors[row_id]["code"]
        assert got == code, (row_id, errors[row_id])
        assert (depths[row_id] is None) == (code is not None), row_id
        assert not errors[row_id] or not any(part.decode() in errors[row_id]["message"]
                                             for part in (SECRET_TEXT[:8], b"[default", b"hostile-table-secret")), row_id
