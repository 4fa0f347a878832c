"""End to end on the local engine: paintings of known maps through `identity` come back as those maps."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import known_maps, png_bytes

import vb_batch
from vb_batch.codecs import depth, normals, segmentation
from vb_batch.io.outputs import read_output
from vb_batch.models.base import ModelBackend


def run(input_path, output_path, tasks, encoding, legend=None, **extra):
    config = {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": "overwrite", "encoding": encoding},
        "tasks": tasks,
        "model": {"backend": "identity", "batch_size": 2},
        "run": {"progress": False},
    }
    if legend is not None:
        config["segmentation"] = {"legend": {n: list(c) for n, c in legend.to_pairs()}}
    for key, value in extra.items():
        section, _, name = key.partition("__")
        config.setdefault(section, {})[name] = value
    summary = vb_batch.annotate(config)
    assert summary.success, summary.render()
    return summary


def depth_step(d):
    """One 8-bit step of the cube walk at depth d (metres): df = 1/(7*255), dd/df = 10 / (2 (1-f)^1.5)."""
    f = 1 - (1 + d / 10) ** -2
    return 1 / (7 * 255) * 10 / (2 * (1 - f) ** 1.5)


@pytest.mark.parametrize("encoding", ["png", "array"])
def test_depth_round_trip(painted_table, tmp_path, encoding):
    paths, truth = painted_table
    run(paths["depth"], tmp_path / "out", ["depth"], encoding)
    table = read_output(str(tmp_path / "out"))
    got = dict(zip(table.column("id").to_pylist(), vb_batch.load_arrays(table, "depth")))
    assert set(got) == set(truth["depth"])
    storage = 1 / 512 if encoding == "png" else 0
    for row_id, expected in truth["depth"].items():
        assert got[row_id].shape == expected.shape and got[row_id].dtype == np.float32
        err = np.abs(got[row_id] - expected)
        assert np.all(err <= depth_step(expected) + storage + 1e-5), (row_id, float(err.max()))
    # Summary columns agree with the stored maps.
    medians = dict(zip(table.column("id").to_pylist(), table.column("depth_median_m").to_pylist()))
    for row_id, values in got.items():
        assert medians[row_id] == pytest.approx(float(np.median(values)), rel=1e-3, abs=2 / 512)


@pytest.mark.parametrize("encoding", ["png", "array"])
def test_normals_round_trip(painted_table, tmp_path, encoding):
    paths, truth = painted_table
    run(paths["normals"], tmp_path / "out", ["normals"], encoding)
    table = read_output(str(tmp_path / "out"))
    for row_id, got in zip(table.column("id").to_pylist(), vb_batch.load_arrays(table, "normals")):
        expected = truth["normals"][row_id]
        cos = np.clip(np.sum(got * expected, axis=-1), -1, 1)
        # One 8-bit colour quantisation (codec), and one more for png storage.
        assert np.degrees(np.arccos(cos)).max() < (1.0 if encoding == "png" else 0.5)
        assert np.allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-4)
    meta = table.schema.field("normals").metadata
    assert meta[b"vb.frame"] == b"opengl"


@pytest.mark.parametrize("encoding", ["png", "array"])
def test_segmentation_round_trip(painted_table, tmp_path, legend, encoding):
    paths, truth = painted_table
    run(paths["segmentation"], tmp_path / "out", ["segmentation"], encoding, legend=legend)
    table = read_output(str(tmp_path / "out"))
    ids = table.column("id").to_pylist()
    for row_id, got in zip(ids, vb_batch.load_arrays(table, "segmentation")):
        np.testing.assert_array_equal(got, truth["segmentation"][row_id])
    fractions = dict(zip(ids, table.column("segmentation_fractions").to_pylist()))
    for row_id, expected in truth["segmentation"].items():
        by_name = {f["name"]: f["fraction"] for f in fractions[row_id]}
        for k, name in enumerate(legend.names):
            assert by_name[name] == pytest.approx(float(np.mean(expected == k)), abs=1e-6)
    meta = table.schema.field("segmentation").metadata
    assert [n for n, _ in json.loads(meta[b"vb.legend"])] == list(legend.names)


def test_all_tasks_schema_and_provenance(painted_table, tmp_path, legend):
    paths, _ = painted_table
    summary = run(paths["depth"], tmp_path / "out", ["depth", "normals", "segmentation"], "png", legend=legend)
    table = read_output(str(tmp_path / "out"))
    expected = [
        "id", "image", "note",
        "depth", "depth_confidence", "depth_min_m", "depth_median_m", "depth_max_m",
        "normals", "normals_confidence",
        "segmentation", "segmentation_confidence", "segmentation_fractions",
        "vb_error", "vb_model", "vb_profile", "vb_run_id", "vb_version",
    ]
    assert table.column_names == expected
    assert table.num_rows == 5
    assert set(table.column("vb_run_id").to_pylist()) == {summary.run_id}
    assert set(table.column("vb_version").to_pylist()) == {vb_batch.__version__}
    assert set(table.column("vb_model").to_pylist()) == {"identity"}
    assert table.column("vb_error").null_count == 5
    depth_meta = table.schema.field("depth").metadata
    assert depth_meta[b"vb.unit"] == b"m" and float(depth_meta[b"vb.scale"]) == 256.0
    # No extension types anywhere: the schema must stay lake-portable.
    assert not any(isinstance(f.type, pa.ExtensionType) for f in table.schema)
    conf = table.column("depth_confidence").to_numpy()
    assert np.all((conf > 0.99) & (conf <= 1.0))  # exact paintings sit on the walk


def test_referring_mask(tmp_path):
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[5:15, 8:20] = 1
    rgb = np.repeat((mask * 255)[..., None], 3, axis=2)
    pq.write_table(pa.table({"id": [1, 2], "image": [png_bytes(rgb), png_bytes(255 - rgb)]}), tmp_path / "in.parquet")
    run(tmp_path / "in.parquet", tmp_path / "out", ["referring"], "png", referring__phrase="the red mug")
    table = read_output(str(tmp_path / "out"))
    masks = dict(zip(table.column("id").to_pylist(), vb_batch.load_arrays(table, "referring")))
    np.testing.assert_array_equal(masks[1], mask)
    np.testing.assert_array_equal(masks[2], 1 - mask)
    assert table.column("referring_fraction").to_pylist()[0] == pytest.approx(mask.mean())


def test_folder_input_ids_are_relative_paths(tmp_path, legend):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    maps = known_maps(0, 16, 16, legend)
    depth_rgb = depth.encode(maps["depth"])
    (folder / "a.png").write_bytes(png_bytes(depth_rgb))
    (folder / "sub" / "b.png").write_bytes(png_bytes(depth_rgb))
    (folder / "readme.txt").write_text("not an image")
    run(folder, tmp_path / "out", ["depth"], "array")
    table = read_output(str(tmp_path / "out"))
    assert sorted(table.column("id").to_pylist()) == ["a.png", "sub/b.png"]
    assert all(u.endswith((".png")) for u in table.column("uri").to_pylist())


def test_content_hash_ids_when_input_has_none(tmp_path, legend):
    maps = known_maps(1, 16, 16, legend)
    data = [png_bytes(normals.encode(maps["normals"])), png_bytes(depth.encode(maps["depth"]))]
    pq.write_table(pa.table({"image": data}), tmp_path / "in.parquet")
    run(tmp_path / "in.parquet", tmp_path / "out", ["depth"], "png")
    first = sorted(read_output(str(tmp_path / "out")).column("id").to_pylist())
    run(tmp_path / "in.parquet", tmp_path / "out2", ["depth"], "png")
    assert first == sorted(read_output(str(tmp_path / "out2")).column("id").to_pylist())
    assert all(i.startswith("sha256:") for i in first) and len(set(first)) == 2


def test_bad_rows_are_kept_with_errors(tmp_path, legend):
    good = png_bytes(depth.encode(known_maps(2, 16, 16, legend)["depth"]))
    cells = [good, b"", None, b"this is not an image", good[: len(good) // 2], good]
    pq.write_table(pa.table({"id": list(range(6)), "image": pa.array(cells, pa.binary())}), tmp_path / "in.parquet")
    summary = run(tmp_path / "in.parquet", tmp_path / "out", ["depth"], "png", run__max_error_fraction=1.0)
    table = read_output(str(tmp_path / "out")).sort_by("id")
    codes = [e and e["code"] for e in table.column("vb_error").to_pylist()]
    assert codes == [None, "empty", "null_image", "not_image", "truncated", None]
    assert table.column("depth").null_count == 4
    assert summary.rows_ok == 2 and summary.rows_failed == 4
    assert summary.errors_by_code == {"empty": 1, "null_image": 1, "not_image": 1, "truncated": 1}


class LegendFollowingBackend(ModelBackend):
    """Repaints a canonical segmentation painting in the colours its prompt asks for (as a model would)."""

    name = "legend-following"

    def __init__(self, legend, spoil_pass_colour=None):
        self.legend = legend
        self.spoil = spoil_pass_colour
        self.prompts_seen = []

    def predict(self, images, prompts, task, seeds):
        out = []
        for image, prompt in zip(images, prompts):
            self.prompts_seen.append(prompt)
            pairs = re.findall(r"(\w+) = \((\d+), (\d+), (\d+)\)", prompt)
            asked = segmentation.Legend.from_pairs([(n, (int(r), int(g), int(b))) for n, r, g, b in pairs])
            assert asked.names == self.legend.names
            ids = segmentation.decode(image, self.legend).values
            painting = segmentation.encode(ids, asked)
            if self.spoil is not None and tuple(asked.colors[0]) == self.spoil:
                painting = segmentation.encode(np.full_like(ids, 1), asked)  # this pass is wrong everywhere
            out.append(painting)
        return out


@pytest.mark.parametrize("decode_on_device", [False, True])
@pytest.mark.parametrize("spoil", [False, True])
def test_segmentation_ensemble_votes_over_permuted_legends(painted_table, tmp_path, legend, spoil, decode_on_device):
    paths, truth = painted_table
    spoil_colour = tuple(legend.permuted(2).colors[0]) if spoil else None
    backend = LegendFollowingBackend(legend, spoil_colour)
    config = {
        "input": {"path": str(paths["segmentation"])},
        "output": {"path": str(tmp_path / "out"), "encoding": "array"},
        "tasks": ["segmentation"],
        "segmentation": {"legend": {n: list(c) for n, c in legend.to_pairs()}, "ensemble": 3},
        "model": {"backend": "identity", "decode_on_device": decode_on_device},
        "run": {"progress": False},
    }
    assert vb_batch.annotate(config, backend=backend).success
    assert len({p for p in backend.prompts_seen}) == 3  # three different legends were asked for
    table = read_output(str(tmp_path / "out"))
    for row_id, got in zip(table.column("id").to_pylist(), vb_batch.load_arrays(table, "segmentation")):
        np.testing.assert_array_equal(got, truth["segmentation"][row_id])
    confidence = np.array(table.column("segmentation_confidence").to_pylist())
    if spoil:
        # The spoiled pass agrees only where the truth is class 1.
        assert np.all(confidence < 1.0) and np.all(confidence >= 2 / 3 - 1e-6)
    else:
        assert np.allclose(confidence, 1.0)


def test_max_error_fraction_fails_the_run_after_committing(tmp_path, capsys):
    good = png_bytes(depth.encode(np.full((16, 16), 2.0, np.float32)))
    cells = [good, b"junk", b"junk", good]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "image": cells}), tmp_path / "in.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'in.parquet'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        "run: {max_error_fraction: 0.25, progress: false}\nmodel: {backend: identity}\n"
    )
    from vb_batch.cli import main

    assert main(["run", str(job)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "max_error_fraction" in out and "not_image: 2" in out.replace("error ", "")
    table = read_output(str(tmp_path / "out"))
    assert table.num_rows == 4  # committed, good and bad rows alike
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.slow  # ~2 s
def test_decode_on_device_gives_the_cpu_decode(painted_table, tmp_path, legend, monkeypatch):
    """`model.decode_on_device` (torch codecs in the model worker, here on the CPU) stores what numpy decodes."""
    import vb_batch.pipeline.model as model_stage

    stacked = []
    real_to_device = model_stage.to_device
    monkeypatch.setattr(model_stage, "to_device", lambda array, device: stacked.append(array.shape) or real_to_device(array, device))
    paths, _ = painted_table
    tasks = ["depth", "normals", "segmentation"]
    for task in tasks:
        for on_device in (False, True):
            run(paths[task], tmp_path / f"{task}-{on_device}", tasks, "array", legend=legend,
                model__decode_on_device=on_device, model__batch_size=8)
        cpu = read_output(str(tmp_path / f"{task}-False")).sort_by("id")
        device = read_output(str(tmp_path / f"{task}-True")).sort_by("id")
        for name in tasks:
            for a, b in zip(vb_batch.load_arrays(cpu, name), vb_batch.load_arrays(device, name)):
                assert a.dtype == b.dtype and a.shape == b.shape
                if name == "segmentation":
                    np.testing.assert_array_equal(a, b)
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(
                cpu.column(f"{name}_confidence").to_numpy(), device.column(f"{name}_confidence").to_numpy(), atol=1e-5
            )
        assert cpu.column("depth_median_m").to_pylist() == pytest.approx(device.column("depth_median_m").to_pylist())
    # Batched by shape: the 5 images of 4 sizes make 4 stacks per task, one of 2 images.
    assert sorted(shape[0] for shape in stacked[:4]) == [1, 1, 1, 2]
    assert len(stacked) == 4 * len(tasks) * len(tasks)


class OneBadPaintingBackend(ModelBackend):
    """The identity model, except that row "depth-2" gets a 4-channel painting no codec reads."""

    name = "one-bad-painting"

    def predict(self, images, prompts, task, seeds):
        return [np.dstack([im, im[..., :1]]) if im.shape[:2] == (40, 40) else im for im in images]


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_a_malformed_painting_fails_only_its_row(painted_table, tmp_path, decode_on_device):
    paths, _ = painted_table
    config = {
        "input": {"path": str(paths["depth"])},
        "output": {"path": str(tmp_path / "out")},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 8, "decode_on_device": decode_on_device},
        "run": {"progress": False},
    }
    summary = vb_batch.annotate(config, backend=OneBadPaintingBackend(None))
    table = read_output(str(tmp_path / "out")).sort_by("id")
    errors = dict(zip(table.column("id").to_pylist(), table.column("vb_error").to_pylist()))
    assert errors.pop("depth-2")["code"] == "output_error"
    assert set(errors.values()) == {None}
    assert summary.rows_ok == 4 and summary.errors_by_code == {"output_error": 1}
