"""Resume and append continue only the same job; `run.retry_failed` re-runs failed rows once.

Resume or append with another job (another encoding, tasks, legend, depth preset, custom preset,
normals frame or model) is refused listing what differs, also when the output lost its
`_vb/output.json` marker (the rows' field metadata say what they are); overwrite replaces the output.
A plain resume counts failed rows as done; `run.retry_failed` re-runs them once, replacing them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from output_safety import (
    assert_each_id_once,
    cli,
    digests,
    job,
    lake_output,
    meta_dir,
    output_ids,
    painting,
    write_images,
)

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import OutputConfig
from vb_batch.io import iceberg
from vb_batch.io.outputs import read_output
from vb_batch.io.sinks.iceberg import FINGERPRINT_PROPERTY
from vb_batch.models.base import register_backend


def compatible_job(input_path: Path, out: dict) -> dict:
    """The first job of an output: three tasks, so that each kind of change can be tried on it."""
    return job(input_path, out, tasks=["depth", "normals", "segmentation"],
               segmentation={"classes": ["road", "car", "sky"]})


CHANGES = {
    # what changes: (how the job changes, what the refusal must name)
    "encoding": (lambda cfg: cfg["output"].update(encoding="array"), "column 'depth': vb.encoding 'png' in the output, 'array'"),
    "tasks": (lambda cfg: cfg.update(tasks=["depth", "normals"]), "columns only in the output: ['segmentation'"),
    "legend": (lambda cfg: cfg.update(segmentation={"classes": ["road", "car", "tree"]}), "column 'segmentation': vb.legend"),
    "depth preset": (lambda cfg: cfg.update(depth={"preset": "steeper"}),
                     "column 'depth': vb.preset 'vision-banana' in the output, 'steeper'"),
    "frame": (lambda cfg: cfg.update(normals={"frame": "opencv"}), "column 'normals': vb.frame 'opengl' in the output, 'opencv'"),
    "model": (lambda cfg: cfg["model"].update(backend="identity-twin"), "model: 'identity' in the output, 'identity-twin'"),
}


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_resume_or_append_with_another_job_is_refused_listing_what_differs(fmt, tmp_path, catalog, capsys):
    # The same class as identity under another name: only the model's name differs.
    register_backend("identity-twin", "vb_batch.models.identity:IdentityBackend", replace=True)
    depth.register_preset(depth.DepthPreset(name="steeper", lam=-2.0), replace=True)
    ids = write_images(tmp_path / "in.parquet", 6)
    out = lake_output(fmt, tmp_path, catalog)
    first = compatible_job(tmp_path / "in.parquet", out)
    assert cli(first, tmp_path, capsys)[0] == 0
    before = digests(tmp_path / ("warehouse" if fmt == "iceberg" else "labels"))
    for n, (change, (apply, named)) in enumerate(CHANGES.items()):
        cfg = json.loads(json.dumps(first))
        apply(cfg)
        cfg["output"]["mode"] = ("resume", "append")[n % 2]
        code, line = cli(cfg, tmp_path, capsys)
        assert code == 2, (change, line)
        assert f"output.mode {cfg['output']['mode']}:" in line and "different job" in line and named in line, (change, line)
    assert digests(tmp_path / ("warehouse" if fmt == "iceberg" else "labels")) == before
    # The same job resumes (nothing to do) and overwrite replaces the output with the new columns.
    summary = vb_batch.annotate(first)
    assert summary.success and summary.rows_skipped == 6 and summary.rows_processed == 0
    cfg = json.loads(json.dumps(first))
    CHANGES["encoding"][0](cfg)
    cfg["output"]["mode"] = "overwrite"
    assert cli(cfg, tmp_path, capsys)[0] == 0
    table = read_output(OutputConfig(**out))
    assert sorted(table.column("id").to_pylist()) == ids
    assert table.schema.field("depth").metadata[b"vb.encoding"] == b"array"


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_an_output_that_lost_its_marker_still_refuses_another_job(fmt, tmp_path, catalog, capsys):
    """Outputs of earlier versions have no marker (`_vb/output.json`; an Iceberg table's `vb.fingerprint`
    property), and a user may delete it: the rows say what they are."""
    write_images(tmp_path / "in.parquet", 6)
    out = lake_output(fmt, tmp_path, catalog)
    first = compatible_job(tmp_path / "in.parquet", out)
    assert cli(first, tmp_path, capsys)[0] == 0
    if fmt == "iceberg":
        with iceberg.iceberg_catalog(catalog).load_table(out["table"]).transaction() as tx:
            tx.remove_properties(FINGERPRINT_PROPERTY)
    else:
        (meta_dir(out) / "output.json").unlink()
    for change in ("encoding", "legend", "model", "tasks"):
        register_backend("identity-twin", "vb_batch.models.identity:IdentityBackend", replace=True)
        cfg = json.loads(json.dumps(first))
        CHANGES[change][0](cfg)
        code, line = cli(cfg, tmp_path, capsys)
        assert code == 2 and CHANGES[change][1] in line, (change, line)
    ids = write_images(tmp_path / "in.parquet", 9)
    summary = vb_batch.annotate(first)  # the same job is still welcome
    assert summary.success and summary.rows_skipped == 6 and summary.rows_processed == 3
    assert sorted(output_ids(out)) == ids


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_retry_failed_re_runs_failed_rows_once(fmt, tmp_path, catalog):
    images = tmp_path / "imgs"
    images.mkdir()
    missing = {3, 6, 7}
    for i in range(10):
        if i not in missing:
            (images / f"img-{i}.png").write_bytes(painting(i))
    ids = [f"img-{i}" for i in range(10)]
    pq.write_table(pa.table({"id": ids, "uri": [str(images / f"{i}.png") for i in ids]}), tmp_path / "in.parquet")
    out = lake_output(fmt, tmp_path, catalog)
    cfg = job(tmp_path / "in.parquet", out, run={"progress": False, "max_error_fraction": 1.0})
    first = vb_batch.annotate(cfg)
    assert first.rows_failed == 3 and first.errors_by_code == {"not_found": 3}
    failed = read_output(OutputConfig(**out), columns=["id", "vb_error"]).to_pylist()
    assert sorted(r["id"] for r in failed if r["vb_error"]) == ["img-3", "img-6", "img-7"]

    for i in missing:  # the operator fixes what was missing
        (images / f"img-{i}.png").write_bytes(painting(i))
    again = vb_batch.annotate(cfg)  # a plain resume: failed rows count as done
    assert again.rows_processed == 0 and again.rows_skipped == 10
    retry = {**cfg, "run": {**cfg["run"], "retry_failed": True}}
    summary = vb_batch.annotate(retry)
    assert summary.success and summary.rows_processed == 3 and summary.rows_ok == 3 and summary.rows_skipped == 7
    assert_each_id_once(out, ids)
    summary = vb_batch.annotate(retry)  # nothing failed any more: nothing to re-run
    assert summary.rows_processed == 0 and summary.rows_skipped == 10
    assert_each_id_once(out, ids)


def test_resume_with_another_custom_depth_preset_is_refused(tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 4)
    first = job(tmp_path / "in.parquet", {"path": str(tmp_path / "labels")}, depth={"preset": {"lam": -3.0, "c": 3.0}})
    assert cli(first, tmp_path, capsys)[0] == 0
    other = {**first, "depth": {"preset": {"lam": -3.0, "c": 30.0}}}  # metres ten times as far for one colour
    code, line = cli(other, tmp_path, capsys)
    assert code == 2 and "vb.preset" in line, line
