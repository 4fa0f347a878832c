"""The normals codec: (n + 1) / 2 colours in the OpenGL frame, frames, confidence, torch path, JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vb_batch.codecs import normals

# JPEG quality 90 bounds stated in docs/codecs.md ("JPEG"), in degrees.
JPEG_BOUNDS_DEG = {"4:2:0": {"p99": 1.5, "max": 3.0}, "4:4:4": {"p99": 1.5, "max": 2.5}}


def angle_deg(a, b):
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def random_unit_vectors(rng, shape):
    n = rng.normal(size=shape + (3,))
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def jpeg(rgb, subsampling="4:2:0"):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return np.asarray(Image.open(buf).convert("RGB"))


def smooth_normals(seed, height=96, width=128):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    n = np.stack(
        [np.sin(xx * rng.uniform(1, 4) + seed), np.cos(yy * rng.uniform(1, 3)), np.full_like(xx, rng.uniform(0.3, 1))],
        axis=-1,
    )
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


# -- round trip ------------------------------------------------------------------

vectors = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3)),
    elements=st.floats(-1, 1),
).filter(lambda n: np.all(np.linalg.norm(n, axis=-1) > 1e-3))


@settings(deadline=None, max_examples=60)
@given(vectors, st.sampled_from(sorted(normals.FRAMES)))
def test_round_trip_within_half_a_degree(n, frame):
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    decoded = normals.decode(normals.encode(n, frame=frame), frame=frame)
    assert decoded.values.dtype == np.float32 and decoded.values.shape == n.shape
    assert angle_deg(decoded.values, n).max() < 0.5
    np.testing.assert_allclose(np.linalg.norm(decoded.values, axis=-1), 1, atol=1e-6)
    assert np.all(decoded.confidence == 1.0)  # exact paintings sit on the unit sphere


def test_round_trip_many_random_vectors():
    n = random_unit_vectors(np.random.default_rng(0), (200, 500))
    for frame in normals.FRAMES:
        assert angle_deg(normals.decode(normals.encode(n, frame), frame).values, n).max() < 0.5


def test_encode_normalises():
    n = np.array([[[0.0, 0.0, 2.0], [0.3, -0.4, 0.0]]])
    np.testing.assert_array_equal(normals.encode(n), normals.encode(n / np.linalg.norm(n, axis=-1, keepdims=True)))


# -- frames ----------------------------------------------------------------------


def test_frames_differ_by_flipping_y_and_z():
    n = random_unit_vectors(np.random.default_rng(1), (4, 5))
    opencv = normals.convert(n, "opengl", "opencv")
    np.testing.assert_array_equal(opencv, n * [1, -1, -1])
    np.testing.assert_array_equal(normals.convert(opencv, "opencv", "opengl"), n)
    assert normals.convert(n, "opengl", "opengl") is n


def test_colours_are_always_in_the_opengl_frame():
    n_opencv = random_unit_vectors(np.random.default_rng(2), (4, 5))
    rgb = normals.encode(n_opencv, frame="opencv")
    np.testing.assert_array_equal(rgb, normals.encode(normals.convert(n_opencv, "opencv", "opengl")))
    # A surface facing the camera is blue-ish in both frames: +z (OpenGL) is toward the viewer.
    facing_camera = {"opengl": [0.0, 0.0, 1.0], "opencv": [0.0, 0.0, -1.0]}
    for frame, n in facing_camera.items():
        np.testing.assert_array_equal(normals.encode(np.array(n), frame), [128, 128, 255])
    np.testing.assert_array_equal(
        normals.decode(rgb, "opencv").values, normals.convert(normals.decode(rgb).values, "opengl", "opencv")
    )


def test_unknown_frame():
    with pytest.raises(ValueError, match="unknown normals frame 'ros'"):
        normals.decode(np.zeros((1, 1, 3), np.uint8), frame="ros")


# -- degenerate input and confidence --------------------------------------------


def test_no_direction_is_nan_with_zero_confidence():
    rgb = normals.encode(np.array([[[0.0, 0.0, 0.0], [np.nan, 1.0, 0.0], [1.0, 0.0, 0.0]]]))
    np.testing.assert_array_equal(rgb[0, :2], [normals.NO_DIRECTION_RGB] * 2)
    decoded = normals.decode(rgb)
    assert np.isnan(decoded.values[0, :2]).all() and np.all(decoded.confidence[0, :2] == 0)
    assert decoded.confidence[0, 2] == 1.0
    # Any colour within MIN_NORM of mid-grey has no direction; float NaN neither.
    near_grey = np.array([[[135, 120, 130], [np.nan, 0, 0]]], np.float32)
    decoded = normals.decode(near_grey)
    assert np.isnan(decoded.values).all() and np.all(decoded.confidence == 0)


def test_confidence_falls_off_the_unit_sphere():
    # Along +x: raw length 1 (on the sphere), then longer (white-ish) and shorter (greyer).
    rgb = np.array([[[255, 128, 128], [255, 200, 128], [255, 255, 255], [200, 128, 128], [160, 128, 128]]], np.uint8)
    decoded = normals.decode(rgb)
    raw = rgb[0] / 255 * 2 - 1
    excess = np.maximum(np.abs(np.linalg.norm(raw, axis=-1) - 1) - normals.QUANTISATION_SLACK, 0)
    np.testing.assert_allclose(decoded.confidence[0], np.exp(-(excess**2) / (2 * normals.NORM_SIGMA**2)), rtol=1e-5)
    assert decoded.confidence[0, 0] == 1.0 and np.all(decoded.confidence[0, 1:] < 0.9)


def test_coarse_grid_of_all_colours():
    levels = np.arange(0, 256, 5, dtype=np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 52, 3)
    decoded = normals.decode(grid)
    has_direction = ~np.isnan(decoded.values).any(axis=-1)
    np.testing.assert_allclose(np.linalg.norm(decoded.values[has_direction], axis=-1), 1, atol=1e-6)
    assert np.all(decoded.confidence[~has_direction] == 0)
    assert np.all((decoded.confidence >= 0) & (decoded.confidence <= 1))


# -- inputs ----------------------------------------------------------------------


def test_batched_equals_per_image():
    images = np.stack([normals.encode(smooth_normals(seed, 16, 24)) for seed in range(3)])
    batched = normals.decode(images, frame="opencv")
    assert batched.values.shape == (3, 16, 24, 3) and batched.confidence.shape == (3, 16, 24)
    for i in range(3):
        np.testing.assert_array_equal(batched.values[i], normals.decode(images[i], frame="opencv").values)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype float64"):
        normals.decode(np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 3\)"):
        normals.encode(np.zeros((2, 2)))


def test_torch_equals_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    noisy = np.clip(normals.encode(smooth_normals(1)) + rng.normal(0, 6, (96, 128, 3)), 0, 255).astype(np.uint8)
    random_colours = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for rgb in (noisy, random_colours, noisy.astype(np.float32) + 0.3):
        for frame in normals.FRAMES:
            expected = normals.decode(rgb, frame)
            got = normals.decode(torch.from_numpy(rgb), frame)
            assert isinstance(got.values, torch.Tensor) and got.values.dtype == torch.float32
            np.testing.assert_allclose(got.values.numpy(), expected.values, atol=1e-6)
            np.testing.assert_allclose(got.confidence.numpy(), expected.confidence, atol=1e-6)
    n = torch.from_numpy(random_unit_vectors(rng, (3, 4)))
    assert torch.equal(normals.convert(n, "opengl", "opencv"), n * torch.tensor([1.0, -1.0, -1.0], dtype=n.dtype))


# -- JPEG ------------------------------------------------------------------------


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4"])
def test_jpeg_q90_within_documented_bound(subsampling):
    bounds = JPEG_BOUNDS_DEG[subsampling]
    for seed in range(3):
        n = smooth_normals(seed, 192, 256)
        errors = angle_deg(normals.decode(jpeg(normals.encode(n), subsampling)).values, n)
        assert np.percentile(errors, 99) <= bounds["p99"], (seed, np.percentile(errors, 99))
        assert errors.max() <= bounds["max"], (seed, errors.max())
