"""The depth codec: power transform + RGB cube walk, presets, confidence, torch path, JPEG."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vb_batch.codecs import Decoded, depth

STEP_F = 1 / (7 * 255)  # one 8-bit step along the 7-edge walk, in f
VERTICES = np.array(depth.CUBE_WALK) * 255

# JPEG quality 90 bounds stated in docs/codecs.md ("JPEG"), in steps of f.
JPEG_BOUNDS_STEPS = {"4:2:0": {"p99": 5, "max": 40}, "4:4:4": {"p99": 4, "max": 16}}


def f_of(d):
    """The spec's transform, written out independently of the codec."""
    return 1 - (1 + np.asarray(d, dtype=np.float64) / 10) ** -2


def d_of(f):
    with np.errstate(divide="ignore"):  # f = 1 is +inf
        return 10 * ((1 - np.asarray(f, dtype=np.float64)) ** -0.5 - 1)


def round_trip_bound(d):
    """Largest |d' - d| rounding to 8 bits can cause: f moves by at most half a
    step and d(f) is convex, so the upper side is the larger one; plus float32
    rounding of the decoded value."""
    return d_of(f_of(d) + STEP_F / 2) - d + 1e-5 * d + 1e-6


def jpeg(rgb, subsampling="4:2:0"):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return np.asarray(Image.open(buf).convert("RGB"))


def smooth_depth(seed, height=96, width=128):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    return 0.5 + rng.uniform(5, 60) * xx + rng.uniform(0, 30) * yy**2


# -- round trip ------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=st.floats(0, 200)))
def test_round_trip_within_half_a_step(depth_m):
    decoded = depth.decode(depth.encode(depth_m))
    assert decoded.values.dtype == np.float32 and decoded.values.shape == depth_m.shape
    assert np.all(np.abs(decoded.values - depth_m) <= round_trip_bound(depth_m))


def test_round_trip_dense_sweep():
    depth_m = np.linspace(0, 200, 200_001).reshape(1, -1)
    err = np.abs(depth.decode(depth.encode(depth_m)).values - depth_m)
    assert np.all(err <= round_trip_bound(depth_m))
    # The bound is real, not loose: near 200 m half a step up is ~14 m and it is used.
    assert round_trip_bound(200.0) == pytest.approx(14.3, abs=0.1)
    assert err[depth_m > 150].max() > 8


def test_design_step_sizes():
    # DESIGN.md: "about 4 mm at 1 m, 2 cm at 10 m, 35 cm at 40 m".
    for d, step in [(1, 0.004), (10, 0.02), (40, 0.35)]:
        assert d_of(f_of(d) + STEP_F) - d == pytest.approx(step, rel=0.25)


def test_zero_is_positive_zero():
    assert np.signbit(depth.decode(depth.encode(np.zeros((1, 1)))).values).sum() == 0


# -- the walk --------------------------------------------------------------------


@pytest.mark.parametrize("k", range(8))
def test_vertex_order(k):
    # f = k/7 lands exactly on the k-th vertex: black red yellow green cyan blue magenta white.
    rgb = depth.encode(np.array([[d_of(k / 7)]]))
    np.testing.assert_array_equal(rgb[0, 0], VERTICES[k])
    assert depth.decode(rgb).confidence[0, 0] == 1.0


def test_every_code_on_the_walk_decodes_exactly_with_confidence_one():
    codes = np.arange(7 * 255)  # all codes below white
    edge, level = codes // 255, codes % 255
    rgb = VERTICES[edge] + (level / 255)[:, None] * (VERTICES[edge + 1] - VERTICES[edge])
    rgb = np.rint(rgb).astype(np.uint8)[None]
    decoded = depth.decode(rgb)
    np.testing.assert_allclose(decoded.values[0], d_of(codes / 1785), rtol=2e-5, atol=1e-6)
    assert np.all(decoded.confidence == 1.0)


def test_white_is_far():
    white = np.full((1, 1, 3), 255, np.uint8)
    assert depth.decode(white).values[0, 0] == np.inf
    capped = depth.DepthPreset(name="capped", max_depth_m=80.0)
    assert depth.decode(white, capped).values[0, 0] == 80.0
    # The last step below white is finite (~412 m), and capped at max_depth_m.
    below = np.array([[[255, 254, 255]]], np.uint8)
    assert depth.decode(below).values[0, 0] == pytest.approx(d_of(1 - STEP_F), rel=1e-5)
    assert depth.decode(below, capped).values[0, 0] == 80.0
    # Float input within half a step of white is saturated, just beyond is not.
    assert depth.decode(np.array([[[255, 254.6, 255]]], np.float32)).values[0, 0] == np.inf
    assert np.isfinite(depth.decode(np.array([[[255, 254.4, 255]]], np.float32)).values[0, 0])


def test_encode_edge_cases():
    rgb = depth.encode(np.array([[np.inf, -3.0, -np.inf, 1e9]]))
    np.testing.assert_array_equal(rgb[0], [[255, 255, 255], [0, 0, 0], [0, 0, 0], [255, 255, 255]])
    with pytest.raises(ValueError, match="NaN"):
        depth.encode(np.array([[1.0, np.nan]]))


def test_encode_any_leading_shape():
    assert depth.encode(np.ones((2, 3, 4))).shape == (2, 3, 4, 3)
    assert depth.encode(5.0).shape == (3,)


# -- confidence ------------------------------------------------------------------


def test_confidence_falls_with_distance_to_the_walk():
    # (255, 100, 0) is on the red -> yellow edge; moving blue up moves straight off it.
    off = np.array([[[255, 100, b] for b in (0, 4, 8, 16, 32)]], np.uint8)
    decoded = depth.decode(off)
    sigma = depth.PRESETS["vision-banana"].confidence_sigma
    expected = np.exp(-np.array([0, 4, 8, 16, 32]) ** 2 / (2 * sigma**2))
    np.testing.assert_allclose(decoded.confidence[0], expected, rtol=1e-5)
    assert decoded.confidence[0, 0] == 1.0 and np.all(np.diff(decoded.confidence[0]) < 0)
    # Depth still comes from the nearest walk point.
    np.testing.assert_allclose(decoded.values[0], decoded.values[0, 0], rtol=1e-6)


def test_coarse_grid_of_all_colours_never_nan():
    levels = np.arange(0, 256, 5, dtype=np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 52, 3)
    decoded = depth.decode(grid)
    assert not np.isnan(decoded.values).any()
    assert np.all(decoded.values >= 0)
    assert np.all(np.isfinite(decoded.values) | np.isposinf(decoded.values))
    assert np.all((decoded.confidence >= 0) & (decoded.confidence <= 1))


# -- inputs ----------------------------------------------------------------------


def test_batched_equals_per_image():
    images = np.stack([depth.encode(smooth_depth(seed, 16, 24)) for seed in range(3)])
    batched = depth.decode(images)
    assert isinstance(batched, Decoded) and batched.values.shape == (3, 16, 24)
    for i in range(3):
        single = depth.decode(images[i])
        np.testing.assert_array_equal(batched.values[i], single.values)
        np.testing.assert_array_equal(batched.confidence[i], single.confidence)


def test_float32_input():
    rgb = depth.encode(smooth_depth(0, 16, 24))
    from_uint8 = depth.decode(rgb)
    from_float = depth.decode(rgb.astype(np.float32))
    np.testing.assert_array_equal(from_uint8.values, from_float.values)
    # Raw generator output beyond 0..255 is clipped; NaN stays NaN with confidence 0.
    raw = np.array([[[300.0, -5.0, -5.0], [np.nan, 0.0, 0.0]]], np.float32)
    decoded = depth.decode(raw)
    assert decoded.values[0, 0] == depth.decode(np.array([[[255, 0, 0]]], np.uint8)).values[0, 0]
    assert np.isnan(decoded.values[0, 1]) and decoded.confidence[0, 1] == 0.0


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 4, 3), np.float64), "dtype float64"),
        (np.zeros((4, 4, 3), np.int16), "dtype int16"),
        (np.zeros((4, 4), np.uint8), "shape"),
        (np.zeros((4, 4, 4), np.uint8), "shape"),
    ],
)
def test_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        depth.decode(bad)


def test_torch_equals_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    noisy = np.clip(depth.encode(smooth_depth(1)) + rng.normal(0, 6, (96, 128, 3)), 0, 255).astype(np.uint8)
    random_colours = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for rgb in (noisy, random_colours, noisy.astype(np.float32) + 0.3):
        expected = depth.decode(rgb)
        got = depth.decode(torch.from_numpy(rgb))
        assert isinstance(got.values, torch.Tensor) and got.values.dtype == torch.float32
        # float32 near d = 0 (a 1 - 1.0001 cancellation) is good to ~1 um.
        np.testing.assert_allclose(got.values.numpy(), expected.values, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.confidence.numpy(), expected.confidence, atol=1e-5)


@pytest.mark.slow  # ~10 s: every one of the 16.7M colours
def test_colour_table_equals_the_direct_computation_on_every_colour(codec_kernels):
    """numpy uint8 decodes through a lazily filled per-preset table: bit for bit the direct float32 computation."""
    from vb_batch.codecs.base import ArrayBackend

    keys = np.arange(1 << 24, dtype=np.uint32)
    cube = np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], axis=-1).astype(np.uint8)
    preset = depth.get_preset("vision-banana")
    direct_values, direct_confidence = depth._decode_pixels(ArrayBackend(np), cube, preset)
    depth._decode_table.cache_clear()
    # Fill it in pieces (a sparse sample, then an overlapping half), then read every colour.
    depth.decode(cube[::977].reshape(1, -1, 3))
    depth.decode(cube[: 1 << 23].reshape(2048, -1, 3))
    table = depth.decode(cube.reshape(4096, 4096, 3))
    assert table.values.dtype == np.float32 and table.confidence.dtype == np.float32
    np.testing.assert_array_equal(table.values.reshape(-1), direct_values)
    np.testing.assert_array_equal(table.confidence.reshape(-1), direct_confidence)
    assert np.isposinf(table.values[-1, -1]) and table.values[0, 0] == 0.0  # white is far, black is 0 m


def test_threads_share_a_colour_table_and_presets_do_not(codec_kernels):
    rng = np.random.default_rng(3)
    images = [
        np.clip(depth.encode(smooth_depth(seed)) + rng.normal(0, 8, (96, 128, 3)), 0, 255).astype(np.uint8)
        for seed in range(8)
    ]
    depth._decode_table.cache_clear()
    depth.decode(images[0][:1, :1])  # one pixel: the table exists, almost empty
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(depth.decode, images))  # the threads fill it concurrently
    assert depth._decode_table.cache_info().misses == 1  # one table, shared by every thread
    depth._decode_table.cache_clear()
    for rgb, got in zip(images, together):
        alone = depth.decode(rgb)
        np.testing.assert_array_equal(got.values, alone.values)
        np.testing.assert_array_equal(got.confidence, alone.confidence)
    white = np.full((1, 1, 3), 255, np.uint8)
    capped = {"name": "capped", "max_depth_m": 80.0}
    assert np.isposinf(depth.decode(white).values[0, 0]) and depth.decode(white, capped).values[0, 0] == 80.0


# -- presets ---------------------------------------------------------------------


def test_presets_registry_and_dict_config():
    default = depth.get_preset("vision-banana")
    assert depth.PRESETS["vision-banana"] is default
    assert (default.lam, default.c, default.vertices) == (-3.0, 10 / 3, depth.CUBE_WALK)
    assert depth.get_preset(default) is default

    config = {"name": "checkpoint-x", "lam": -2.0, "c": 5.0, "vertices": [[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]]}
    custom = depth.register_preset(config)
    try:
        assert depth.get_preset("checkpoint-x") == custom
        d = np.linspace(0, 50, 1000).reshape(1, -1)
        rgb = depth.encode(d, preset=config)
        np.testing.assert_array_equal(rgb[0, 0], [0, 0, 0])
        assert depth.decode(np.full((1, 1, 3), 255, np.uint8), "checkpoint-x").values[0, 0] == np.inf
        # Round trip within half a step of this walk (3 edges * 255 levels).
        step_f = 1 / (3 * 255)
        f = 1 - (1 + d / 10) ** -1
        bound = 10 * ((1 - f - step_f / 2) ** -1 - 1) - d + 1e-5 * d + 1e-6
        assert np.all(np.abs(depth.decode(rgb, preset=custom).values - d) <= bound)
        with pytest.raises(ValueError, match="already registered"):
            depth.register_preset({**config, "c": 6.0})
        depth.register_preset({**config, "c": 6.0}, replace=True)
    finally:
        depth.PRESETS.unregister("checkpoint-x")


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"lam": -0.5}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"c": 0}, "c must"),
        ({"vertices": [[0, 0, 0], [1, 1, 1], [0, 0]]}, "vertices"),
        ({"vertices": [[0, 0, 0]]}, "vertices"),
        ({"vertices": [[0, 0, 0], [2, 0, 0]]}, "vertices"),
        ({"vertices": [[0, 0, 0], [1, 0, 0], [0, 0, 0]]}, "vertices"),
        ({"max_depth_m": -1}, "max_depth_m"),
        ({"confidence_sigma": 0}, "confidence_sigma"),
        ({"colour": "red"}, "unknown field"),
    ],
)
def test_preset_validation_names_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        depth.get_preset({"name": "bad", **fields})


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="unknown depth preset 'nope'"):
        depth.decode(np.zeros((1, 1, 3), np.uint8), preset="nope")


# -- JPEG ------------------------------------------------------------------------


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4"])
def test_jpeg_q90_within_documented_bound(subsampling):
    bounds = JPEG_BOUNDS_STEPS[subsampling]
    for seed in range(3):
        depth_m = smooth_depth(seed, 192, 256)
        decoded = depth.decode(jpeg(depth.encode(depth_m), subsampling))
        steps = np.abs(f_of(decoded.values) - f_of(depth_m)) / STEP_F
        assert np.percentile(steps, 99) <= bounds["p99"], (seed, np.percentile(steps, 99))
        assert steps.max() <= bounds["max"], (seed, steps.max())


# -- the colour table against the decode as it was before it ---------------------


def decode_before_tables(rgb, preset):
    """depth.decode's numpy computation as it stood before block-filled tables (commit 2acf763), kept verbatim
    as the reference: float32 projection on every edge, ties to the earlier edge, Barron's inverse."""
    preset = depth.get_preset(preset)
    red, green, blue = np.ascontiguousarray(rgb.reshape(-1, 3).T, dtype=np.float32)
    num_edges = preset.num_edges
    vertices = np.asarray(preset.vertices) * 255.0
    edges = []
    for start, end in zip(vertices[:-1], vertices[1:]):
        direction = end - start
        edges.append((start.tolist(), direction.tolist(), float(direction @ direction)))
    saturated_below = 0.5 / max(abs(d) for d in edges[-1][1])
    far_m = np.inf if preset.max_depth_m is None else float(preset.max_depth_m)
    exponent = 1.0 / (preset.lam + 1.0)
    scale_m = -preset.lam * preset.c
    confidence_factor = -0.5 / preset.confidence_sigma**2
    best_remaining = best_distance2 = None
    for e, (start, direction, length2) in enumerate(edges):
        offsets = [plane - s if s else plane for plane, s in zip((red, green, blue), start)]
        along = sum(o * (d / length2) for o, d in zip(offsets, direction) if d)
        t = np.clip(along, 0.0, 1.0)
        distance2 = sum((o - t * d if d else o) ** 2 for o, d in zip(offsets, direction))
        remaining = (num_edges - e) - t
        if best_distance2 is None:
            best_remaining, best_distance2 = remaining, distance2
        else:
            closer = distance2 < best_distance2 * depth.TIE_MARGIN
            best_remaining = np.where(closer, remaining, best_remaining)
            best_distance2 = np.minimum(distance2, best_distance2)
    saturated = best_remaining <= saturated_below
    one_minus_f = np.clip(best_remaining, saturated_below, None) * (1.0 / num_edges)
    depth_m = scale_m * (one_minus_f**exponent - 1.0)
    if preset.max_depth_m is not None:
        depth_m = np.clip(depth_m, None, far_m)
    depth_m = np.where(saturated, far_m, depth_m)
    confidence = np.exp(best_distance2 * confidence_factor)
    confidence = np.where(np.isnan(confidence), 0.0, confidence)
    return depth_m.reshape(rgb.shape[:-1]), confidence.reshape(rgb.shape[:-1])


TABLE_PRESETS = [
    "vision-banana",
    {"name": "capped", "max_depth_m": 80.0, "confidence_sigma": 3.0},
    {"name": "diagonal", "vertices": ((0, 0, 0), (1, 1, 0), (0.5, 0.2, 1), (1, 1, 1)), "lam": -2.0, "c": 5.0},
    {"name": "one-edge", "vertices": ((0, 0, 0), (1, 1, 1))},
]


@pytest.mark.parametrize("preset", TABLE_PRESETS, ids=lambda p: p if isinstance(p, str) else p["name"])
def test_table_decode_is_bit_identical_to_the_decode_before_it(preset, codec_kernels):
    """Random colours, noisy paintings, ties (vertices, midpoints between edges) and white, through a table
    filled image by image: the same float32 bits as the direct computation it replaced."""
    preset = depth.get_preset(preset)
    rng = np.random.default_rng(21)
    walk = np.round(np.asarray(preset.vertices) * 255)
    ties = np.concatenate([walk, np.round((walk[:-1] + walk[1:]) / 2), np.round((walk[:-2] + walk[2:]) / 2)])
    near_white = np.clip(walk[-1] + rng.integers(-2, 3, (50, 3)), 0, 255)
    images = [
        rng.integers(0, 256, (64, 96, 3)),  # anywhere in the cube
        np.clip(depth.encode(smooth_depth(1), preset) + rng.normal(0, 3, (96, 128, 3)), 0, 255).round(),
        np.clip(depth.encode(smooth_depth(2), preset) + rng.normal(0, 12, (96, 128, 3)), 0, 255).round(),
        np.concatenate([ties, near_white, [[0, 0, 0], [255, 255, 255]]])[None],
        rng.integers(0, 256, (2, 40, 40, 3)),  # a batch
    ]
    depth._decode_table.cache_clear()
    for rgb in images:
        rgb = rgb.astype(np.uint8)
        decoded = depth.decode(rgb, preset)
        expected_values, expected_confidence = decode_before_tables(rgb, preset)
        assert decoded.values.dtype == np.float32 and decoded.values.shape == rgb.shape[:-1]
        np.testing.assert_array_equal(decoded.values.view(np.uint32), expected_values.view(np.uint32))
        np.testing.assert_array_equal(decoded.confidence.view(np.uint32), expected_confidence.view(np.uint32))
    white = depth.decode(np.full((1, 1, 3), 255, np.uint8), preset).values[0, 0]
    assert white == (np.inf if preset.max_depth_m is None else preset.max_depth_m)


def test_chunked_lookups_with_new_colours_in_some_chunks_equal_the_direct_computation(monkeypatch, codec_kernels):
    """Chunks whose colours are all known are unpacked at once; the others wait for one fill: same bits."""
    from vb_batch.codecs import base

    monkeypatch.setattr(base, "LOOKUP_PIXELS", 100)
    rng = np.random.default_rng(21)
    rgb = rng.integers(0, 256, (7, 50, 3)).astype(np.uint8)  # 350 pixels: 4 chunks, the last one short
    depth._decode_table.cache_clear()
    depth.decode(rgb[:2])  # the first chunk's colours are known, the rest are new
    decoded = depth.decode(rgb)
    expected_values, expected_confidence = decode_before_tables(rgb, "vision-banana")
    np.testing.assert_array_equal(decoded.values.view(np.uint32), expected_values.view(np.uint32))
    np.testing.assert_array_equal(decoded.confidence.view(np.uint32), expected_confidence.view(np.uint32))
    depth._decode_table.cache_clear()


def test_table_computes_each_new_colour_once_and_nothing_else(codec_kernels):
    """A lookup computes the distinct colours without an entry, once each; colours seen before are lookups only."""
    from vb_batch.codecs.base import colour_keys

    depth._decode_table.cache_clear()
    table = depth._decode_table(depth.get_preset("vision-banana"))
    computed = []
    compute = table.compute_colours
    table.compute_colours = lambda keys: (computed.append(keys.tolist()), compute(keys))[1]
    first = np.array([[[100, 0, 0], [100, 9, 3], [100, 0, 0]]], np.uint8)
    depth.decode(first)
    assert computed == [sorted(colour_keys(first[0, :2]).tolist())]
    assert np.count_nonzero(table.entries) == 2
    second = np.array([[[100, 9, 3], [50, 50, 50], [50, 50, 50], [100, 0, 0]]], np.uint8)
    decoded = depth.decode(second)
    assert computed[1:] == [colour_keys(second[0, 1:2]).tolist()]
    assert np.count_nonzero(table.entries) == 3
    np.testing.assert_array_equal(decoded.values, decode_before_tables(second, "vision-banana")[0].reshape(1, 4))
    depth.decode(second)
    assert len(computed) == 2  # all seen: no fill
    depth._decode_table.cache_clear()
