"""The segmentation codec: legends, palettes, nearest-colour decode, ensemble vote, torch path, JPEG."""

from __future__ import annotations

import io
import json
import math
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vb_batch.codecs import Decoded, segmentation
from vb_batch.codecs.segmentation import Legend

CITYSCAPES_COLOURS = {
    "road": (128, 64, 128), "sidewalk": (244, 35, 232), "building": (70, 70, 70), "wall": (102, 102, 156),
    "fence": (190, 153, 153), "pole": (153, 153, 153), "traffic light": (250, 170, 30),
    "traffic sign": (220, 220, 0), "vegetation": (107, 142, 35), "terrain": (152, 251, 152),
    "sky": (70, 130, 180), "person": (220, 20, 60), "rider": (255, 0, 0), "car": (0, 0, 142),
    "truck": (0, 0, 70), "bus": (0, 60, 100), "train": (0, 80, 100), "motorcycle": (0, 0, 230),
    "bicycle": (119, 11, 32),
}

# JPEG quality 90 bounds stated in docs/codecs.md ("JPEG"), 16-pixel class blocks:
# the largest share of pixels given a wrong class, and left unlabelled.
JPEG_BOUNDS = {
    "4:2:0": {"mislabelled": 0.03, "unlabelled": 0.10},
    "4:4:4": {"mislabelled": 0.005, "unlabelled": 0.01},
}


def names(k):
    return [f"class {i}" for i in range(k)]


def reference_decode(rgb, legend, max_distance):
    """Brute force in float64, straight from the spec, for a few thousand pixels."""
    order = np.lexsort(legend.colors.T[::-1])
    candidates = np.vstack([legend.colors[order], [0, 0, 0]]).astype(np.float64)
    if max_distance is None:  # half the distance to the nearest other candidate, per class
        between = np.linalg.norm(candidates[:, None] - candidates[None], axis=-1)
        np.fill_diagonal(between, np.inf)
        radii = 0.5 * between.min(axis=1)
    else:
        radii = np.full(len(candidates), max_distance)
    distances = np.linalg.norm(rgb.reshape(-1, 1, 3).astype(np.float64) - candidates, axis=-1)
    nearest = np.argmin(distances, axis=1)
    sorted_distances = np.sort(distances, axis=1)
    d1, d2 = sorted_distances[:, 0], sorted_distances[:, 1]
    labelled = (nearest != len(legend)) & (d1 <= radii[nearest])
    ids = np.where(labelled, np.append(order, 0)[nearest], legend.unlabelled)
    return ids.reshape(rgb.shape[:-1]), np.where(labelled, 1 - d1 / d2, 0).reshape(rgb.shape[:-1])


def noisy(rgb, sigma, rng):
    return np.clip(rgb + rng.normal(0, sigma, rgb.shape), 0, 255).round().astype(np.uint8)


def jpeg(rgb, subsampling="4:2:0"):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return np.asarray(Image.open(buf).convert("RGB"))


# -- legends ---------------------------------------------------------------------


def test_cityscapes_legend():
    legend = Legend.cityscapes()
    assert len(legend) == 19 and legend.names[0] == "road" and legend.names[18] == "bicycle"
    assert dict(legend.to_pairs()) == CITYSCAPES_COLOURS
    assert legend.min_separation() == 20.0  # bus (0, 60, 100) vs train (0, 80, 100)
    subset = Legend.from_names(["car", "road", "sky"], palette="cityscapes")
    assert subset.to_pairs() == [("car", (0, 0, 142)), ("road", (128, 64, 128)), ("sky", (70, 130, 180))]
    with pytest.raises(ValueError, match=r"\['tree'\] are not Cityscapes classes"):
        Legend.from_names(["road", "tree"], palette="cityscapes")


def test_legend_attributes():
    legend = Legend.from_names(["road", "car", "person"])
    assert len(legend) == 3 and legend.names == ("road", "car", "person")
    assert legend.colors.shape == (3, 3) and legend.colors.dtype == np.uint8
    assert not legend.colors.flags.writeable
    assert legend.unlabelled == 255 and legend.dtype == np.uint8
    pairs = legend.to_pairs()
    assert json.loads(json.dumps(pairs)) == [[n, list(c)] for n, c in pairs]
    assert Legend.from_pairs(pairs) == legend and hash(Legend.from_pairs(pairs)) == hash(legend)
    big = Legend.from_names(names(256))
    assert big.unlabelled == 65535 and big.dtype == np.uint16
    assert Legend.from_names(names(255)).dtype == np.uint8
    assert Legend.from_pairs([("object", (255, 255, 255))]).min_separation() == math.inf


def test_permuted_keeps_names_and_shuffles_colours():
    legend = Legend.cityscapes()
    permuted = legend.permuted(1)
    assert permuted.names == legend.names
    assert sorted(map(tuple, permuted.colors.tolist())) == sorted(map(tuple, legend.colors.tolist()))
    assert not np.array_equal(permuted.colors, legend.colors)
    assert permuted == legend.permuted(1) and permuted != legend.permuted(2)


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([("road", (0, 0, 0))], r"\['road'\] use black"),
        ([("road", (1, 2, 3)), ("road", (4, 5, 6))], r"duplicate class name\(s\) \['road'\]"),
        ([("road", (1, 2, 3)), ("car", (1, 2, 3))], r"\['road', 'car'\] share \(1, 2, 3\)"),
        ([("road", (1, 2, 256))], r"\['road'\] are outside 0..255"),
        ([("road", (1.5, 2, 3))], "integer"),
        ([("road", (1, 2))], r"\['road'\] are not \(r, g, b\)"),
        ([("", (1, 2, 3))], "non-empty strings"),
        ([], "needs 1..65534 classes"),
    ],
)
def test_legend_validation(pairs, match):
    with pytest.raises(ValueError, match=match):
        Legend.from_pairs(pairs)


def test_legend_colours_must_match_names():
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        Legend(("a", "b"), np.array([[1, 2, 3]]))


# -- default palette -------------------------------------------------------------


def test_default_palette_is_separated_deterministic_and_stable():
    start = time.perf_counter()
    palette = segmentation.default_palette(150)
    assert time.perf_counter() - start < 2.0
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert not np.any(np.all(palette == 0, axis=1))
    # Prefix-stable: adding classes keeps earlier colours.
    segmentation.default_palette.cache_clear()
    np.testing.assert_array_equal(segmentation.default_palette(19), palette[:19])
    # Farther apart than Cityscapes' hand-picked colours, and far from black.
    for k, at_least in [(8, 170), (19, 110), (32, 90), (64, 60), (150, 45)]:
        legend = Legend.from_names(names(k))
        assert legend.min_separation() >= at_least, k
        assert np.linalg.norm(legend.colors.astype(float), axis=1).min() >= at_least, k


# -- encode / decode -------------------------------------------------------------


def test_encode_paints_unlabelled_and_out_of_range_black():
    legend = Legend.from_names(["a", "b"])
    rgb = segmentation.encode(np.array([[0, 1, 2, -1, 255]]), legend)
    np.testing.assert_array_equal(rgb[0], [legend.colors[0], legend.colors[1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="integers"):
        segmentation.encode(np.array([0.5]), legend)


@pytest.mark.slow  # ~2.5 s
@settings(deadline=None, max_examples=25)
@given(st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_exact_on_legend_colours(num_classes, seed):
    legend = Legend.from_names(names(num_classes)).permuted(seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_classes + 1, (12, 17))
    ids[ids == num_classes] = legend.unlabelled
    ids = ids.astype(legend.dtype)
    decoded = segmentation.decode(segmentation.encode(ids, legend), legend)
    assert decoded.values.dtype == legend.dtype
    np.testing.assert_array_equal(decoded.values, ids)
    np.testing.assert_array_equal(decoded.confidence, np.where(ids == legend.unlabelled, 0.0, 1.0))


@pytest.mark.parametrize(
    "legend", [Legend.cityscapes(), Legend.from_names(names(150))], ids=["cityscapes", "generated-150"]
)
def test_decode_matches_brute_force_reference(legend):
    rng = np.random.default_rng(4)
    rgb = np.concatenate([
        rng.integers(0, 256, (40, 100, 3)),  # anywhere in the cube
        noisy(segmentation.encode(rng.integers(0, len(legend), (40, 100)), legend), 12, rng),
    ]).astype(np.uint8)
    for max_distance in (None, 30.0, math.inf):
        expected_ids, expected_confidence = reference_decode(rgb, legend, max_distance)
        decoded = segmentation.decode(rgb, legend, max_distance=max_distance)
        np.testing.assert_array_equal(decoded.values, expected_ids)
        np.testing.assert_allclose(decoded.confidence, expected_confidence, atol=1 / 65535)


def test_ties_and_thresholds():
    legend = Legend.from_pairs([("b", (200, 0, 0)), ("a", (100, 0, 0))])
    rgb = np.array([[[150, 0, 0], [130, 0, 0], [100, 0, 0], [100, 0, 60], [50, 0, 0], [49, 0, 0]]], np.uint8)
    decoded = segmentation.decode(rgb, legend, max_distance=math.inf)
    # (150,0,0) is equidistant from both classes: the colour that sorts first, (100,0,0) = "a", wins with confidence 0.
    # (50,0,0) is equidistant from "a" and black: a class beats black.
    assert decoded.values.tolist() == [[1, 1, 1, 1, 1, 255]]
    expected_confidence = [0, 1 - 30 / 70, 1, 1 - 60 / math.hypot(100, 60), 0, 0]
    np.testing.assert_allclose(decoded.confidence[0], expected_confidence, atol=1e-4)
    # Default threshold: half the distance to the nearest other colour (100 for both) = 50:
    # (100,0,60) is 60 away from "a" -> unlabelled.
    np.testing.assert_array_equal(legend.class_separations(), [100, 100])
    assert segmentation.decode(rgb, legend).values.tolist() == [[1, 1, 1, 255, 1, 255]]
    assert segmentation.decode(rgb, legend, max_distance=0).values.tolist() == [[255, 255, 1, 255, 255, 255]]
    with pytest.raises(ValueError, match="max_distance"):
        segmentation.decode(rgb, legend, max_distance=-1)


def test_two_colour_referring_legend():
    legend = Legend.from_pairs([("object", (255, 255, 255))])
    rgb = np.array([[[255, 255, 255], [200, 190, 210], [90, 100, 80], [0, 0, 0], [255, 255, 0]]], np.uint8)
    # Radius: half of white-to-black (220.8); (255, 255, 0) is nearer white but 255 away.
    assert segmentation.decode(rgb, legend).values.tolist() == [[0, 0, 255, 255, 255]]
    assert segmentation.decode(rgb, legend, max_distance=math.inf).values.tolist() == [[0, 0, 255, 255, 0]]


def test_gaussian_noise_generated_palette_19_classes():
    legend = Legend.from_names(names(19))
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 19, (512, 512))
    decoded = segmentation.decode(noisy(segmentation.encode(ids, legend), 8, rng), legend)
    assert np.mean(decoded.values == ids) >= 0.99  # measured: 1.0000


def test_gaussian_noise_cityscapes_colours_are_too_close():
    """Cityscapes' official colours do not reach 99% at sigma 8 (docs/codecs.md, noise table).

    bus (0,60,100) and train (0,80,100) are 20 apart, fence and pole 37. At
    sigma = 8 levels the per-class default radius (10 for bus and train)
    leaves ~8% of all pixels unlabelled, and even with no threshold bus and
    train are confused ~10% of the time. A single radius of half the global
    min separation would be far worse: ~41% right.
    """
    legend = Legend.cityscapes()
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 19, (512, 512))
    rgb = noisy(segmentation.encode(ids, legend), 8, rng)
    default = np.mean(segmentation.decode(rgb, legend).values == ids)
    global_half_min = np.mean(segmentation.decode(rgb, legend, max_distance=10).values == ids)
    no_threshold = segmentation.decode(rgb, legend, max_distance=math.inf).values == ids
    assert 0.90 <= default <= 0.95  # measured: 0.92
    assert 0.35 <= global_half_min <= 0.47  # measured: 0.41
    assert 0.98 <= no_threshold.mean() < 0.99  # measured: 0.987
    per_class = {name: no_threshold[ids == k].mean() for k, name in enumerate(legend.names)}
    close = {"bus", "train", "fence", "pole", "wall", "sky"}
    assert all(per_class[name] >= 0.999 for name in legend.names if name not in close), per_class
    assert 0.85 <= min(per_class["bus"], per_class["train"]) <= 0.95


def test_float_input_is_rounded_and_nan_is_unlabelled():
    legend = Legend.cityscapes()
    rgb = segmentation.encode(np.array([[0, 5, 13]]), legend).astype(np.float32) + 0.4
    rgb[0, 2] = np.nan
    decoded = segmentation.decode(rgb, legend)
    assert decoded.values.tolist() == [[0, 5, 255]]
    np.testing.assert_array_equal(decoded.confidence, [[1, 1, 0]])


def test_batched_equals_per_image():
    legend = Legend.cityscapes()
    rng = np.random.default_rng(7)
    images = noisy(segmentation.encode(rng.integers(0, 19, (3, 20, 30)), legend), 6, rng)
    batched = segmentation.decode(images, legend)
    assert batched.values.shape == (3, 20, 30)
    for i in range(3):
        single = segmentation.decode(images[i], legend)
        np.testing.assert_array_equal(batched.values[i], single.values)
        np.testing.assert_array_equal(batched.confidence[i], single.confidence)


def test_permuted_legends_share_one_decode_table():
    legend = Legend.from_names(names(19))
    segmentation.decode(np.zeros((1, 1, 3), np.uint8), legend)
    hits = segmentation._decode_table.cache_info().hits
    segmentation.decode(np.zeros((1, 1, 3), np.uint8), legend.permuted(3))
    assert segmentation._decode_table.cache_info().hits == hits + 1


def test_threads_share_a_decode_table(codec_kernels):
    legend = Legend.from_names(names(64))
    rng = np.random.default_rng(12)
    images = [noisy(segmentation.encode(rng.integers(0, 64, (64, 64)), legend), 10, rng) for _ in range(8)]
    segmentation._decode_table.cache_clear()
    segmentation.decode(images[0][:1, :1], legend)  # one pixel: the table exists, almost empty
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda rgb: segmentation.decode(rgb, legend), images))
    assert segmentation._decode_table.cache_info().misses == 1  # one table, filled by every thread
    segmentation._decode_table.cache_clear()
    for rgb, got in zip(images, together):
        alone = segmentation.decode(rgb, legend)
        np.testing.assert_array_equal(got.values, alone.values)
        np.testing.assert_array_equal(got.confidence, alone.confidence)


def test_150_classes_on_a_megapixel_stays_within_memory():
    # An H*W*K float64 distance tensor would be 1.26 GB; the table is 64 MB.
    legend = Legend.from_names(names(150))
    rng = np.random.default_rng(8)
    ids = np.kron(rng.integers(0, 150, (32, 32)), np.ones((32, 32), np.int64))
    rgb = noisy(segmentation.encode(ids, legend), 4, rng)
    segmentation._decode_table.cache_clear()
    tracemalloc.start()
    try:
        decoded = segmentation.decode(rgb, legend)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6, peak
    assert np.mean(decoded.values == ids) > 0.999


def test_torch_equals_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    for legend in (Legend.cityscapes(), Legend.from_names(names(300))):
        ids = rng.integers(0, len(legend), (2, 24, 32))
        rgb = noisy(segmentation.encode(ids, legend), 10, rng)
        rgb[0, :4] = rng.integers(0, 256, (4, 32, 3))
        for image in (rgb, rgb.astype(np.float32) - 0.3):
            expected = segmentation.decode(image, legend)
            got = segmentation.decode(torch.from_numpy(image), legend)
            assert isinstance(got.values, torch.Tensor)
            np.testing.assert_array_equal(got.values.numpy().astype(legend.dtype), expected.values)
            np.testing.assert_allclose(got.confidence.numpy(), expected.confidence, atol=1 / 65535)


# -- JPEG ------------------------------------------------------------------------


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4"])
def test_jpeg_q90_within_documented_bound(subsampling):
    legend = Legend.from_names(names(19))
    rng = np.random.default_rng(10)
    ids = np.kron(rng.integers(0, 19, (12, 16)), np.ones((16, 16), np.int64))
    decoded = segmentation.decode(jpeg(segmentation.encode(ids, legend), subsampling), legend)
    right = decoded.values == ids
    # Pixels 2 or more pixels away from a class boundary always decode right.
    offset = np.arange(16)
    interior = ((offset >= 2) & (offset <= 13))[:, None] & ((offset >= 2) & (offset <= 13))[None, :]
    assert right[np.tile(interior, (12, 16))].all()
    unlabelled = decoded.values == legend.unlabelled
    assert np.mean(~right & ~unlabelled) <= JPEG_BOUNDS[subsampling]["mislabelled"]
    assert np.mean(unlabelled) <= JPEG_BOUNDS[subsampling]["unlabelled"]


# -- vote ------------------------------------------------------------------------


def as_decoded(values, dtype=np.uint8):
    values = np.asarray(values, dtype=dtype)
    return Decoded(values=values, confidence=np.ones(values.shape, np.float32))


def test_vote_majority_share_and_ties():
    passes = [
        as_decoded([[1, 2, 3, 255, 7, 255]]),
        as_decoded([[1, 2, 4, 255, 255, 255]]),
        as_decoded([[1, 5, 5, 6, 255, 9]]),
    ]
    voted = segmentation.vote(passes)
    # Majorities win (unlabelled too, with confidence 0); 3-way ties go to the lowest id.
    assert voted.values.tolist() == [[1, 2, 3, 255, 255, 255]]
    np.testing.assert_allclose(voted.confidence, [[1, 2 / 3, 1 / 3, 0, 0, 0]])
    # On a tie in the count a labelled class beats unlabelled.
    tie = segmentation.vote([as_decoded([[4, 255]]), as_decoded([[255, 6]])])
    assert tie.values.tolist() == [[4, 6]] and tie.confidence.tolist() == [[0.5, 0.5]]
    assert voted.values.dtype == np.uint8 and voted.confidence.dtype == np.float32


def test_vote_uint16_and_errors():
    voted = segmentation.vote([as_decoded([[300, 65535]], np.uint16)] * 2 + [as_decoded([[2, 65535]], np.uint16)])
    assert voted.values.tolist() == [[300, 65535]] and voted.values.dtype == np.uint16
    with pytest.raises(ValueError, match="same shape"):
        segmentation.vote([as_decoded([[1]]), as_decoded([[1, 2]])])
    with pytest.raises(ValueError, match="at least one"):
        segmentation.vote([])


def test_ensemble_with_permuted_legends():
    legend = Legend.from_names(names(19))
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 19, (64, 64))
    decodes = []
    for seed in range(5):
        pass_legend = legend if seed == 0 else legend.permuted(seed)
        painted = segmentation.encode(ids, pass_legend)
        # Each pass paints 10% of its pixels a wrong colour, different pixels each pass.
        painted[rng.random(ids.shape) < 0.1] = rng.integers(1, 256, 3)
        decodes.append(segmentation.decode(painted, pass_legend))
    voted = segmentation.vote(decodes)
    # A pixel stays wrong only if 3 of 5 passes err there: 0.86%.
    assert np.mean(decodes[0].values == ids) < 0.95
    assert np.mean(voted.values == ids) > 0.985


def test_vote_torch():
    torch = pytest.importorskip("torch")
    passes = [[[1, 2, 3]], [[1, 2, 4]], [[1, 5, 5]]]
    voted = segmentation.vote([Decoded(torch.tensor(p, dtype=torch.uint8), None) for p in passes])
    expected = segmentation.vote([as_decoded(p) for p in passes])
    assert voted.values.tolist() == expected.values.tolist()
    np.testing.assert_allclose(voted.confidence.numpy(), expected.confidence)


@pytest.mark.parametrize("k", [2, 3, 4, 19])
def test_permuted_legends_never_repeat_a_colour_for_a_class(k):
    legend = Legend.from_names([f"c{i}" for i in range(k)])
    passes = [legend.permuted(p) for p in range(k)]
    for cls in range(k):
        colours = {tuple(p.colors[cls]) for p in passes}
        assert len(colours) == k  # each pass paints this class in a colour no other pass uses
    assert all(p.names == legend.names for p in passes)


# -- the colour table against the decode as it was before it ---------------------


def decode_before_tables(rgb, legend, max_distance=None):
    """segmentation.decode's numpy result as it stood before block-filled tables (commit 2acf763), kept as the
    reference: float32 brute force over every candidate (legend colours in (r, g, b) order, then black),
    argmin's first on ties, confidence 1 - d1/d2 rounded to 1/65535 steps as the table stores it."""
    order = np.lexsort(legend.colors.T[::-1])
    candidates = np.vstack([legend.colors[order], [0, 0, 0]]).astype(np.float32)
    class_of = np.append(order, legend.unlabelled)
    if max_distance is None:
        radii = segmentation.DEFAULT_MAX_DISTANCE_FRACTION * legend.class_separations()[order]
    else:
        radii = np.full(len(legend), float(max_distance))
    radii2 = np.asarray(np.append(radii, 0.0) ** 2, dtype=np.float32)
    black = len(candidates) - 1
    red, green, blue = np.ascontiguousarray(rgb.reshape(-1, 3).T, dtype=np.float32)
    distance2 = (red[:, None] - candidates[:, 0]) ** 2
    distance2 += (green[:, None] - candidates[:, 1]) ** 2
    distance2 += (blue[:, None] - candidates[:, 2]) ** 2
    first = np.argmin(distance2, axis=1)
    d1 = np.take_along_axis(distance2, first[:, None], axis=1)[:, 0]
    d2 = np.amin(np.where(np.arange(len(candidates)) == first[:, None], np.inf, distance2), axis=1)
    labelled = (first != black) & (d1 <= radii2[first])
    confidence = np.where(labelled, 1.0 - np.sqrt(d1) / np.sqrt(d2), 0.0)
    nearest = np.where(labelled, first, black)
    steps = np.rint(confidence * 65535).astype(np.uint32)
    values = class_of.astype(legend.dtype)[nearest].reshape(rgb.shape[:-1])
    return values, (steps.astype(np.float32) * np.float32(1 / 65535)).reshape(rgb.shape[:-1])


@pytest.mark.slow  # ~9 s over its legends (up to 300 classes)
@pytest.mark.parametrize(
    "legend",
    [
        Legend.cityscapes(),
        Legend.from_names(names(150)),
        Legend.from_names(names(300)),  # uint16 ids
        Legend.from_pairs([("b", (200, 0, 0)), ("a", (100, 0, 0)), ("c", (150, 50, 0)), ("d", (150, 0, 50))]),
        Legend.from_pairs([("object", (255, 255, 255))]),
    ],
    ids=["cityscapes", "generated-150", "generated-300", "ties", "referring"],
)
def test_table_decode_is_bit_identical_to_the_decode_before_it(legend, codec_kernels):
    """Random colours, noisy paintings, colours equidistant from two or more candidates, and every colour of a
    few whole blocks, through a table filled image by image: the same ids and confidence bits as before."""
    rng = np.random.default_rng(31)
    colours = legend.colors.astype(np.int64)
    midpoints = (colours[:, None] + np.vstack([colours, [[0, 0, 0]]])[None]) // 2  # ties, between candidates
    block = np.stack(np.meshgrid(*[np.arange(144, 160)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    images = [
        rng.integers(0, 256, (48, 64, 3)),
        noisy(segmentation.encode(rng.integers(0, len(legend), (48, 64)), legend), 4, rng),
        noisy(segmentation.encode(rng.integers(0, len(legend), (48, 64)), legend), 24, rng),
        np.concatenate([midpoints.reshape(-1, 3), block])[None],
        rng.integers(0, 256, (2, 16, 16, 3)),  # a batch
    ]
    segmentation._decode_table.cache_clear()
    for max_distance in (None, 30.0, math.inf, 0):
        for rgb in images:
            rgb = rgb.astype(np.uint8)
            decoded = segmentation.decode(rgb, legend, max_distance=max_distance)
            expected_ids, expected_confidence = decode_before_tables(rgb, legend, max_distance)
            assert decoded.values.dtype == legend.dtype and decoded.values.shape == rgb.shape[:-1]
            np.testing.assert_array_equal(decoded.values, expected_ids)
            np.testing.assert_array_equal(decoded.confidence.view(np.uint32), expected_confidence.view(np.uint32))


def test_ties_stay_with_the_colour_that_sorts_first():
    """Four candidates equidistant from one colour: the table's pruned search keeps the full search's winner."""
    legend = Legend.from_pairs([("z", (110, 100, 100)), ("y", (90, 100, 100)), ("x", (100, 110, 100)), ("w", (100, 90, 100))])
    decoded = segmentation.decode(np.array([[[100, 100, 100]]], np.uint8), legend, max_distance=math.inf)
    assert decoded.values.tolist() == [[1]]  # (90, 100, 100) sorts first
    assert decoded.confidence.tolist() == [[0.0]]


@pytest.mark.slow  # ~10 s: every one of the 16.7M colours
def test_table_equals_the_decode_before_it_on_every_colour(codec_kernels):
    legend = Legend.cityscapes()
    keys = np.arange(1 << 24, dtype=np.uint32)
    cube = np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    segmentation._decode_table.cache_clear()
    decoded = segmentation.decode(cube, legend)
    for rows in range(0, 4096, 512):
        expected_ids, expected_confidence = decode_before_tables(cube[rows : rows + 512], legend)
        np.testing.assert_array_equal(decoded.values[rows : rows + 512], expected_ids)
        np.testing.assert_array_equal(decoded.confidence[rows : rows + 512], expected_confidence)
    segmentation._decode_table.cache_clear()
