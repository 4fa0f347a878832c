"""Real photos on the CPU side: reduced JPEG decoding, the stored grid (`output.resolution`,
`output.max_side`), resize and PNG encoding of maps, and the stage time accounting."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import vb_batch
from vb_batch.codecs import depth as depth_codec
from vb_batch.codecs import normals as normals_codec
from vb_batch.io.encodings import ColumnMeta, decode_map, encode_map
from vb_batch.io.images import decode_for_model, decode_image
from vb_batch.io.outputs import read_output
from vb_batch.models import sizing
from vb_batch.models.base import BACKENDS, ModelBackend, register_backend
from vb_batch.stages import needed_size, resize_values
from vb_batch.timing import COUNTS, PhaseTimes, collecting


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth gradients plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, 128 + 100 * np.sin(x / 97 + y / 131)], -1)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray, orientation: int = 1) -> bytes:
    image = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


# ---------------------------------------------------------------------------- reduced decoding


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("resolution", [160, 300, 2000])
def test_reduced_jpeg_is_never_below_the_needed_size_and_matches_a_full_decode(resolution, orientation):
    data = jpeg(photo(900, 1200), orientation)
    needed = lambda h, w: needed_size(resolution, h, w)  # noqa: E731
    full = decode_image(data, 10**8)
    reduced = decode_for_model(data, 10**8, needed=needed)
    upright = (1200, 900) if orientation == 6 else (900, 1200)
    assert full.shape[:2] == upright and reduced.size == upright
    need_h, need_w = needed(*upright)
    assert reduced.pixels.shape[0] >= need_h and reduced.pixels.shape[1] >= need_w
    factor = upright[0] // reduced.pixels.shape[0]
    assert factor == {160: 4, 300: 2, 2000: 1}[resolution]  # the smallest DCT scale that still fits
    if factor > 1:
        assert reduced.reduced
        # libjpeg's DCT scaling is a box average, up to JPEG rounding: compare with a full decode averaged.
        boxed = np.asarray(Image.fromarray(full).reduce(factor)).astype(np.int16)
        diff = np.abs(boxed - reduced.pixels.astype(np.int16))
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6
    else:
        np.testing.assert_array_equal(reduced.pixels, full)


def test_other_formats_and_no_needed_size_decode_in_full():
    rgb = photo(400, 600)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    png = decode_for_model(buf.getvalue(), 10**8, needed=lambda h, w: (50, 75))
    assert png.pixels.shape[:2] == png.size == (400, 600) and not png.reduced
    assert decode_for_model(jpeg(rgb), 10**8).pixels.shape[:2] == (400, 600)


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(64, 9000),
    aspect=st.floats(1 / 8, 8),
    resolution=st.sampled_from([256, 512, 768, 1024, 1536]),
    sizing_mode=st.sampled_from(sizing.SIZINGS),
    rule=st.sampled_from(sorted(sizing.RULES)),
)
def test_needed_size_covers_every_working_size_rule(height, aspect, resolution, sizing_mode, rule):
    """The reduced decode is never smaller than what any pipeline's sizing rule (exact or buckets) or Marigold works at."""
    width = max(64, round(height * aspect))
    need_h, need_w = needed_size(resolution, height, width)
    assert need_h <= height and need_w <= width
    marigold = max(height, width)
    assert max(need_h, need_w) >= min(marigold, resolution)
    if rule == "QwenImageEditPipeline" and resolution != 1024:
        return  # Qwen conditions at 1024**2 whatever is asked; other resolutions are refused
    try:
        work_h, work_w = sizing.size_for(sizing.RULES[rule], height, width, resolution, sizing_mode)
    except sizing.SizeError:
        return
    # The model resizes to its working size: the decode must hold at least that, unless the image itself is smaller.
    assert need_h >= min(height, work_h) and need_w >= min(width, work_w)


# ---------------------------------------------------------------------------- resize and encode


def pillow_bilinear(values: np.ndarray, kind: str, size: tuple[int, int]) -> np.ndarray:
    """resize_values as it was defined before the fast path: Pillow's float BILINEAR, one channel at a time."""
    height, width = size
    if values.shape[:2] == size:
        return values
    channels = values[..., None] if values.ndim == 2 else values
    resized = np.stack(
        [np.asarray(Image.fromarray(channels[..., c].astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
         for c in range(channels.shape[-1])], axis=-1)
    if kind == "normals":
        with np.errstate(invalid="ignore", divide="ignore"):
            resized = resized / np.linalg.norm(resized, axis=-1, keepdims=True)
    return resized[..., 0] if values.ndim == 2 else resized


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(2, 40), w=st.integers(2, 40), fy=st.floats(0.3, 6), fx=st.floats(0.3, 6),
    kind=st.sampled_from(["depth", "normals"]), holes=st.booleans(), seed=st.integers(0, 2**16),
)
def test_bilinear_resize_keeps_the_pillow_convention(h, w, fy, fx, kind, holes, seed):
    rng = np.random.default_rng(seed)
    shape = (h, w) if kind == "depth" else (h, w, 3)
    values = (rng.random(shape) * 10 - (0 if kind == "depth" else 5)).astype(np.float32)
    if holes:
        values[rng.random(shape) < 0.05] = np.nan
        values[rng.random(shape) < 0.05] = np.inf
    size = (max(1, round(h * fy)), max(1, round(w * fx)))
    new, old = resize_values(values, kind, size), pillow_bilinear(values, kind, size)
    assert new.shape == old.shape and new.dtype == np.float32
    both = np.isfinite(new) & np.isfinite(old)
    # Normals are divided by their interpolated length, which amplifies float32 rounding where that length is
    # short (opposite normals blended): 1.3e-5 was seen at h=w=25, fy=fx=5.71875, seed=25.
    tolerance = 1e-4 if kind == "normals" else 1e-5
    np.testing.assert_allclose(new[both], old[both], rtol=tolerance, atol=tolerance)
    if not holes:
        assert both.all()
    else:
        # A hole spreads to the pixels it weighs in: never further than Pillow spread it; +inf stays far.
        assert not (~np.isfinite(new) & np.isfinite(old)).any()
        assert np.isposinf(new[np.isposinf(old)]).all()
        # Pillow also spread it through taps of weight 0 (0 * inf = NaN): there the new value is the finite blend.
        spared = np.isfinite(new) & ~np.isfinite(old)
        holes_weight = pillow_bilinear((~np.isfinite(values)).astype(np.float32), "depth", size)
        assert (holes_weight[spared] == 0).all()


def test_nearest_resize_is_exact_for_classes_and_masks():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 20, (37, 53)).astype(np.uint8)
    for size in [(100, 141), (37, 53), (12, 9), (500, 7)]:
        rows = (np.arange(size[0]) * 37 // size[0])[:, None]
        cols = (np.arange(size[1]) * 53 // size[1])[None, :]
        np.testing.assert_array_equal(resize_values(ids, "classes", size), ids[rows, cols])


def test_fast_normals_png_matches_the_codec_and_depth_png_is_exact():
    rng = np.random.default_rng(5)
    n = rng.normal(size=(300, 200, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[0, 0] = np.nan
    n[0, 1] = 0.0
    for frame in ("opengl", "opencv"):
        meta = ColumnMeta(kind="normals", encoding="png", unit="unit vector", task="normals", frame=frame)
        stored = np.asarray(Image.open(io.BytesIO(encode_map(n, meta))))
        codec = normals_codec.encode(np.nan_to_num(n), frame=frame)
        assert np.abs(stored[1:].astype(int) - codec[1:]).max() <= 1 and (stored[1:] == codec[1:]).mean() > 0.999
        assert stored[0, 0].tolist() == [0, 0, 0] and stored[0, 1].tolist() == list(normals_codec.NO_DIRECTION_RGB)
    d = (rng.random((300, 200)) * 80).astype(np.float32)
    d[0, :3] = [np.nan, np.inf, 1e-9]
    meta = ColumnMeta(kind="depth", encoding="png", unit="m", task="depth", scale=256.0, offset=0.0)
    codes = np.asarray(Image.open(io.BytesIO(encode_map(d, meta))))
    expected = np.clip(np.rint(d.astype(np.float64) * 256), 1, 65535)
    assert codes[0, :3].tolist() == [0, 65535, 1]
    np.testing.assert_array_equal(codes[1:], expected[1:].astype(np.uint16))


def test_png_compression_levels_round_trip_and_trade_size():
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:256, 0:256]
    d = (2 + x / 64 + np.sin(y / 9) + rng.normal(0, 0.01, (256, 256))).astype(np.float32)
    meta = ColumnMeta(kind="depth", encoding="png", unit="m", task="depth", scale=256.0, offset=0.0)
    cells = {level: encode_map(d, meta, level) for level in (0, 1, 9)}
    back = {level: decode_map(cell, meta) for level, cell in cells.items()}
    np.testing.assert_array_equal(back[0], back[1])
    np.testing.assert_array_equal(back[0], back[9])
    assert len(cells[0]) > len(cells[1]) >= len(cells[9])


# ---------------------------------------------------------------------------- the stored grid, end to end


class PhotoPainter(ModelBackend):
    """Paints a known depth ramp and a fixed normal at a working size of about R*R pixels, as real editors do."""

    name = "photo-painter"
    seen: list[tuple[int, ...]] = []

    @classmethod
    def working_resolution(cls, model_cfg) -> int:
        return model_cfg.processing_resolution or 128

    def predict(self, images, prompts, task, seeds):
        resolution = self.cfg.processing_resolution or 128
        answers = []
        for image in images:
            PhotoPainter.seen.append(image.shape)
            scale = resolution / math.sqrt(image.shape[0] * image.shape[1])
            h, w = (max(16, round(side * scale / 16) * 16) for side in image.shape[:2])
            if task == "depth":
                answers.append(depth_codec.encode(ramp(h, w)))
            else:
                answers.append(normals_codec.encode(np.broadcast_to(np.float32([0.6, 0.0, 0.8]), (h, w, 3))))
        return answers


def ramp(h: int, w: int) -> np.ndarray:
    return np.broadcast_to(np.linspace(1.0, 9.0, w, dtype=np.float32), (h, w)).copy()


@pytest.fixture
def painter():
    PhotoPainter.seen = []
    register_backend("photo-painter", PhotoPainter, replace=True)
    yield PhotoPainter
    BACKENDS.unregister("photo-painter")


def annotate(tmp_path, name, images, **output):
    pq.write_table(pa.table({"id": list(range(len(images))), "image": images}), tmp_path / "in.parquet")
    summary = vb_batch.annotate({
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / name), "mode": "overwrite", "report": False, **output},
        "tasks": ["depth", "normals"],
        "model": {"backend": "photo-painter", "batch_size": 2},
        "run": {"progress": False},
    })
    assert summary.success, summary
    return summary, read_output(str(tmp_path / name)).sort_by("id")


@pytest.mark.slow
def test_output_resolution_modes_store_their_grid_with_metadata_and_full_precision_summaries(tmp_path, painter):
    """2000x1500 JPEGs: decoded at 1/8 for a 128 px model; stored at the input, working and capped grids."""
    images = [jpeg(photo(1500, 2000, seed)) for seed in range(2)]
    _, at_input = annotate(tmp_path, "input", images)
    assert all(shape[:2] == (188, 250) for shape in painter.seen)  # the reduced decode reached the model
    _, at_working = annotate(tmp_path, "working", images, resolution="working")
    summary, capped = annotate(tmp_path, "capped", images, max_side=400, png_compression=6)

    working = (112, 144)  # the painter's working size for 4:3 at 128**2 px
    grids = {"input": (1500, 2000), "working": working, "capped": (300, 400)}
    for name, table in (("input", at_input), ("working", at_working), ("capped", capped)):
        for depth, normals in zip(vb_batch.load_arrays(table, "depth"), vb_batch.load_arrays(table, "normals")):
            assert depth.shape == grids[name] and normals.shape == (*grids[name], 3)
            # The stored ramp spans the image's width whatever the grid: left edge ~1 m, right edge ~9 m.
            assert abs(float(depth[:, 0].mean()) - 1.0) < 0.1 and abs(float(depth[:, -1].mean()) - 9.0) < 0.1
            np.testing.assert_allclose(normals.mean(axis=(0, 1)), [0.6, 0.0, 0.8], atol=0.03)  # 8-bit paint
        # Summaries come from the model's own grid: the same for every stored grid, equal to the ramp's.
        truth = depth_codec.decode(depth_codec.encode(ramp(*working))).values
        np.testing.assert_allclose(table.column("depth_median_m").to_pylist(), [float(np.median(truth))] * 2, rtol=1e-6)
        np.testing.assert_allclose(table.column("depth_max_m").to_pylist(), [float(truth.max())] * 2, rtol=1e-6)

    # The default grid writes exactly the columns and metadata it always did (old outputs keep their fingerprint).
    assert "image_height" not in at_input.column_names
    assert b"vb.grid" not in (at_input.schema.field("depth").metadata or {})
    for table, grid in ((at_working, "working"), (capped, "input")):
        meta = table.schema.field("depth").metadata
        assert meta[b"vb.grid"] == grid.encode() and b"fx, cx times map_width" in meta[b"vb.grid_to_image"]
        assert table.column("image_height").to_pylist() == [1500, 1500]
        assert table.column("image_width").to_pylist() == [2000, 2000]
    assert capped.schema.field("normals").metadata[b"vb.max_side"] == b"400"
    assert summary.phase_seconds.keys() >= {"fetch_decode", "model", "codec_decode", "resize", "encode"}


def test_identity_model_decodes_in_full_and_stages_book_their_phases(tmp_path):
    """A model that works at the input's size gets the whole image; every stage's work lands in its phase."""
    from vb_batch.config import JobConfig
    from vb_batch.models.identity import IdentityBackend
    from vb_batch.stages import Plan, decode_encode, fetch_decode, run_model

    depth_image = depth_codec.encode(ramp(300, 400))
    cfg = JobConfig.model_validate({
        "input": {"path": "unused.parquet"}, "tasks": ["depth"], "model": {"backend": "identity"},
        "output": {"resolution": "working", "max_side": 200},
    })
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary())])
    plan = Plan.build(cfg, schema, image_column="image")
    buf = io.BytesIO()
    Image.fromarray(depth_image).save(buf, "PNG")
    batch = pa.RecordBatch.from_pydict({"id": [1], "image": [buf.getvalue()]}, schema=schema)
    times = PhaseTimes()
    with collecting(times):
        out = decode_encode(run_model(fetch_decode(batch, plan), plan, IdentityBackend(cfg.model)), plan)
    stored = vb_batch.load_arrays(pa.Table.from_batches([out]), "depth")[0]
    assert stored.shape == (150, 200)
    assert out.column(out.schema.get_field_index("image_width")).to_pylist() == [400]
    booked = times.as_dict()
    assert set(booked) - set(COUNTS) == {"fetch_decode", "model", "codec_decode", "resize", "encode"}
    assert (booked["model_calls"], booked["model_images"]) == (1, 1)  # the counts ride with the phases
