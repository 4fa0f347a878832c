"""The codecs' compiled kernels (`vb_batch.codecs.kernels`): the same bits as numpy, and when they run.

The bit-for-bit checks against the decode before the tables run through both
kernels in test_codecs_depth.py and test_codecs_segmentation.py (the
`codec_kernels` fixture); here: the two kernels against each other on hostile
inputs, the policy that picks one, and the fallbacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PAINTED_LEGEND, write_painted_input

import vb_batch
from vb_batch.codecs import depth, kernels, normals, segmentation
from vb_batch.config import ConfigError
from vb_batch.codecs.segmentation import Legend

VB_BATCH = str(Path(sys.executable).with_name("vb-batch"))  # the CLI of this venv


def names(count: int) -> list[str]:
    return [f"class {i}" for i in range(count)]


def both_kernels(decode, rgb):
    """`decode(rgb)` with the compiled kernels and with numpy, each from empty tables."""
    results = []
    for mode in ("compiled", "numpy"):
        depth._decode_table.cache_clear()
        segmentation._decode_table.cache_clear()
        with kernels.forced(mode):
            results.append(decode(rgb))
    return results


def assert_same_bits(compiled, numpy_):
    assert compiled.values.dtype == numpy_.values.dtype and compiled.values.shape == numpy_.values.shape
    assert compiled.values.tobytes() == numpy_.values.tobytes()
    assert compiled.confidence.tobytes() == numpy_.confidence.tobytes()


def hostile_images(rng):
    """Whole-cube noise, a batch, a strided view, one pixel, zero pixels, every corner of the cube."""
    cube = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    corners = np.array([[[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]], np.uint8)
    return {
        "noise": cube,
        "batch": rng.integers(0, 256, (3, 17, 9, 3), dtype=np.uint8),
        "strided": cube[::2, ::3],
        "one pixel": cube[:1, :1],
        "empty": np.zeros((0, 5, 3), np.uint8),
        "corners": corners,
    }


@pytest.mark.parametrize(
    "preset",
    ["vision-banana", {"name": "diagonal", "vertices": ((0, 0, 0), (1, 1, 0), (0.5, 0.2, 1), (1, 1, 1)), "lam": -2.0}],
    ids=["vision-banana", "diagonal"],
)
def test_depth_kernels_agree_on_hostile_images(preset):
    for name, rgb in hostile_images(np.random.default_rng(5)).items():
        compiled, numpy_ = both_kernels(lambda x: depth.decode(x, preset), rgb)
        assert compiled.values.shape == rgb.shape[:-1], name
        assert_same_bits(compiled, numpy_)


@pytest.mark.parametrize("frame", ["opengl", "opencv"])
def test_normals_kernels_agree_on_hostile_images(frame):
    """Including the mid-grey colours with no direction, whose values are NaN (the same NaN bits) and
    confidence 0, and paintings of unit normals."""
    rng = np.random.default_rng(6)
    grey = np.stack(np.meshgrid(*[np.arange(116, 141)] * 3, indexing="ij"), axis=-1).reshape(1, -1, 3).astype(np.uint8)
    painted = normals.encode(rng.normal(size=(40, 40, 3)))
    for name, rgb in {**hostile_images(rng), "grey": grey, "painted": painted}.items():
        compiled, numpy_ = both_kernels(lambda x: normals.decode(x, frame), rgb)
        assert compiled.values.shape == rgb.shape, name
        assert_same_bits(compiled, numpy_)
    assert np.isnan(compiled.values).any() is np.False_  # painted unit normals all have a direction
    grey_decoded = normals.decode(grey, frame)
    assert np.isnan(grey_decoded.values).any() and (grey_decoded.confidence[np.isnan(grey_decoded.values[..., 0])] == 0).all()


@pytest.mark.parametrize("classes", [1, 19, 300], ids=["one class", "cityscapes-sized", "uint16 ids"])
@pytest.mark.parametrize("max_distance", [None, 0.0, 40.0, float("inf")])
def test_segmentation_kernels_agree_on_hostile_images(classes, max_distance):
    legend = Legend.from_names(names(classes))
    for name, rgb in hostile_images(np.random.default_rng(classes)).items():
        compiled, numpy_ = both_kernels(lambda x: segmentation.decode(x, legend, max_distance=max_distance), rgb)
        assert compiled.values.dtype == legend.dtype, name
        assert_same_bits(compiled, numpy_)


def test_a_lookup_leaves_its_bitmap_clean_and_fills_each_new_colour_once():
    """The per-thread bitmap of colours missed must be all zeros after every lookup, or a later lookup would skip
    filling a colour and read an empty entry."""
    table_fills = []
    with kernels.forced("compiled"):
        depth._decode_table.cache_clear()
        table = depth._decode_table(depth.get_preset("vision-banana"))
        compute = table.compute_colours
        table.compute_colours = lambda keys: (table_fills.append(len(keys)), compute(keys))[1]
        rng = np.random.default_rng(9)
        first = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
        depth.decode(first)
        assert not kernels._per_thread.seen.any()
        distinct = len(np.unique(first.reshape(-1, 3), axis=0))
        assert sum(table_fills) == distinct  # each new colour once, repeats in the image included
        overlapping = np.concatenate([first[:50], rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)])
        got = depth.decode(overlapping)
        assert not kernels._per_thread.seen.any()
        assert sum(table_fills) == len(np.unique(np.concatenate([first, overlapping]).reshape(-1, 3), axis=0))
        # A few new colours (under an eighth of the pixels): looked up again by index, not all over.
        few_new = first.copy()
        few_new[::10, ::10] = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
        mostly_known = depth.decode(few_new)
        assert not kernels._per_thread.seen.any()
    depth._decode_table.cache_clear()
    with kernels.forced("numpy"):
        assert_same_bits(got, depth.decode(overlapping))
        assert_same_bits(mostly_known, depth.decode(few_new))
    depth._decode_table.cache_clear()


def test_threads_fill_one_table_with_the_compiled_kernels():
    rng = np.random.default_rng(4)
    legend = Legend.from_names(names(64))
    images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(8)]
    with kernels.forced("compiled"):
        segmentation._decode_table.cache_clear()
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda rgb: segmentation.decode(rgb, legend), images))
    segmentation._decode_table.cache_clear()
    with kernels.forced("numpy"):
        for rgb, got in zip(images, together):
            assert_same_bits(got, segmentation.decode(rgb, legend))
    segmentation._decode_table.cache_clear()


def test_the_modes_and_a_bad_one_names_the_variable(monkeypatch):
    for wanted, expected in (("auto", True), ("compiled", True), ("numpy", False), ("", True)):
        monkeypatch.setattr(kernels, "_loaded", kernels._UNSET)
        monkeypatch.setenv(kernels.ENV_VAR, wanted)
        assert (kernels.active() is not None) is expected, wanted
    monkeypatch.setattr(kernels, "_loaded", kernels._UNSET)
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="VB_BATCH_CODEC_KERNELS must be one of auto, compiled, numpy; got 'fast'"):
        kernels.active()


def test_a_bad_mode_stops_a_job_before_it_starts_as_a_config_error(tmp_path, monkeypatch):
    """Not a decode error on every row: the job refuses to start (the CLI's exit 2)."""
    write_painted_input(tmp_path / "in.parquet")
    monkeypatch.setenv(kernels.ENV_VAR, "gpu")
    config = {"input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out")},
              "tasks": ["depth"], "model": {"backend": "identity"}, "run": {"progress": False}}
    with pytest.raises(ConfigError, match="VB_BATCH_CODEC_KERNELS must be one of auto, compiled, numpy; got 'gpu'"):
        vb_batch.annotate(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda k, px, table: k.depth_lookup(px, kernels.EVERY_PIXEL, table[:-1], *outputs(4), *kernels.Missed(4).arrays),
         "entries must be 2..24 uint64"),
        (lambda k, px, table: k.depth_lookup(px, np.array([0, 4]), table, *outputs(4), *kernels.Missed(2).arrays),
         "out of range"),
        (lambda k, px, table: k.depth_lookup(px, kernels.EVERY_PIXEL, table, *outputs(3), *kernels.Missed(4).arrays),
         "one float32 per pixel"),
        (lambda k, px, table: k.depth_lookup(px[::2], kernels.EVERY_PIXEL, table, *outputs(2), *kernels.Missed(2).arrays),
         "contiguous"),
        (lambda k, px, table: k.depth_lookup(px, kernels.EVERY_PIXEL, table, *outputs(4), *kernels.Missed(1).arrays),
         "too short"),
        (lambda k, px, table: k.nearest_by_block(np.array([1 << 24], np.int32), np.zeros(6, np.float32),
                                                 np.zeros(1, np.float32), *[np.zeros(96, np.int32)] * 2,
                                                 np.zeros(1, np.int32), np.zeros(1, np.uint32)), "not a table key"),
    ],
    ids=["short table", "index out of range", "short output", "strided pixels", "short scratch", "bad key"],
)
def test_a_wrong_call_raises_instead_of_touching_memory_out_of_bounds(call, match):
    """The C kernels check every buffer's size before a loop: a caller's mistake is a ValueError, not a crash."""
    compiled = pytest.importorskip("vb_batch.codecs._kernels")
    pixels = np.zeros((4, 3), np.uint8)
    table = depth._decode_table(depth.get_preset("vision-banana")).entries
    with pytest.raises((ValueError, BufferError), match=match):
        call(compiled, pixels, table)


def outputs(count: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty(count, np.uint32), np.empty(count, np.uint32)


PROBE = """
import json, sys
import numpy as np
from vb_batch.codecs import depth, kernels
rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
decoded = depth.decode(rgb)
print(json.dumps({"kernels": None if kernels.active() is None else "compiled",
                  "bits": decoded.values.view(np.uint32).tolist()[:40]}))
"""


@pytest.mark.slow  # two fresh interpreters, ~1 s each
def test_without_the_built_kernels_decoding_falls_back_to_numpy_and_says_so_when_asked():
    environ = {**os.environ, kernels.ENV_VAR: "compiled"}
    built = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    compiled = json.loads(built.stdout.splitlines()[-1])
    assert compiled["kernels"] == "compiled"
    # Not built: an entry of None in sys.modules makes the import raise ImportError.
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['vb_batch.codecs._kernels'] = None\n" + PROBE],
        env=environ, capture_output=True, text=True, timeout=120,
    )
    assert blocked.returncode == 0, blocked.stderr
    without = json.loads(blocked.stdout.splitlines()[-1])
    assert without["kernels"] is None and without["bits"] == compiled["bits"]
    assert "the compiled kernels are not built" in blocked.stderr


@pytest.mark.slow  # two CLI runs, ~6 s each
def test_a_job_writes_the_same_output_with_either_kernel(tmp_path):
    """The whole local job, in a fresh process per kernel: depth, normals and segmentation columns identical."""
    write_painted_input(tmp_path / "in.parquet")
    outputs = {}
    for mode in ("compiled", "numpy"):
        config = {
            "input": {"path": str(tmp_path / "in.parquet")},
            "output": {"path": str(tmp_path / mode), "report": False},
            "tasks": ["depth", "normals", "segmentation"],
            "segmentation": {"classes": list(PAINTED_LEGEND.names)},
            "model": {"backend": "identity"},
            "run": {"progress": False},
        }
        (tmp_path / f"{mode}.json").write_text(json.dumps(config))
        done = subprocess.run(
            [VB_BATCH, "run", str(tmp_path / f"{mode}.json"), "-q"],
            env={**os.environ, kernels.ENV_VAR: mode}, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        outputs[mode] = pq.read_table(tmp_path / mode).sort_by("id").drop_columns(["vb_run_id"])
    assert outputs["compiled"].num_rows == 12
    assert outputs["compiled"].equals(outputs["numpy"])
