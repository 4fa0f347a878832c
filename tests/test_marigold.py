"""The tiny Marigold pipelines through the real `from_pretrained` path and the whole local pipeline."""

from __future__ import annotations

import numpy as np
import pytest

import vb_batch
from vb_batch.cli import main
from vb_batch.demo import make_sample_images
from vb_batch.io.sinks import read_output

pytestmark = pytest.mark.slow


def job(images, out, paths, batch_size=4, **model):
    return {
        "input": {"path": str(images)},
        "output": {"path": str(out), "mode": "overwrite"},
        "tasks": ["depth", "normals"],
        "model": {"backend": "marigold", "path": paths, "batch_size": batch_size, "device": "cpu", **model},
        "run": {"progress": False},
    }


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    make_sample_images(folder, count=7)
    return folder


def test_depth_and_normals_from_saved_checkpoints(sample_images, tmp_path, tiny_marigold):
    summary = vb_batch.annotate(job(sample_images, tmp_path / "out", tiny_marigold))
    assert summary.success and summary.rows_ok == 7, summary.render()
    table = read_output(str(tmp_path / "out"))
    # Marigold's depth is affine-invariant: stored and summarised as relative, never as metres.
    assert "depth_median_rel" in table.column_names and "depth_median_m" not in table.column_names
    assert table.schema.field("depth").metadata[b"vb.unit"].startswith(b"relative")
    assert table.column("depth_confidence").null_count == 7  # Marigold gives no confidence without ensembling
    uris = table.column("uri").to_pylist()
    from PIL import Image

    for uri, d, n in zip(uris, vb_batch.load_arrays(table, "depth"), vb_batch.load_arrays(table, "normals")):
        with Image.open(uri) as im:
            width, height = im.size
            if im.getexif().get(0x0112) in (6, 8):
                width, height = height, width
        assert d.shape == (height, width) and n.shape == (height, width, 3)
        assert np.nanmin(d) >= 0 and np.nanmax(d) <= 1
        assert np.allclose(np.linalg.norm(n, axis=-1), 1, atol=1e-3)
    assert set(table.column("vb_model").to_pylist()) == {
        f"marigold:depth={tiny_marigold['depth']},normals={tiny_marigold['normals']}"
    }


def test_labels_do_not_depend_on_batching(sample_images, tmp_path, tiny_marigold):
    one = job(sample_images, tmp_path / "b1", tiny_marigold, batch_size=1)
    four = job(sample_images, tmp_path / "b4", tiny_marigold, batch_size=4)
    one["tasks"] = four["tasks"] = ["depth"]
    vb_batch.annotate(one)
    vb_batch.annotate(four)
    a = read_output(str(tmp_path / "b1")).sort_by("id")
    b = read_output(str(tmp_path / "b4")).sort_by("id")
    for x, y in zip(vb_batch.load_arrays(a, "depth"), vb_batch.load_arrays(b, "depth")):
        # Per-row seeds make the noise identical; only float reduction order may differ.
        assert np.nanmax(np.abs(x - y)) < 2e-3


def test_marigold_cannot_segment(sample_images, tmp_path, tiny_marigold, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"input: {{path: {sample_images}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        f"tasks: [segmentation]\nsegmentation: {{classes: [a, b]}}\n"
        f"model: {{backend: marigold, path: {{depth: {tiny_marigold['depth']}}}}}\n"
    )
    assert main(["run", str(cfg)]) == 2
    assert "cannot do ['segmentation']" in capsys.readouterr().err


def test_missing_checkpoint_is_a_config_error(tmp_path, capsys, sample_images):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"input: {{path: {sample_images}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        f"model: {{backend: marigold, path: {tmp_path / 'no-such-model'}}}\n"
    )
    assert main(["run", str(cfg)]) == 2
    assert "model.path" in capsys.readouterr().err


def test_model_options_reach_the_pipeline(sample_images, tmp_path, tiny_marigold):
    # Marigold's own ensembling, through model.options: its uncertainty needs ensemble_size > 1.
    cfg = job(sample_images, tmp_path / "out", {"depth": tiny_marigold["depth"]},
              options={"ensemble_size": 2, "ensembling_kwargs": {"reduction": "median"}})
    cfg["tasks"] = ["depth"]
    assert vb_batch.annotate(cfg).success
    plain = job(sample_images, tmp_path / "plain", {"depth": tiny_marigold["depth"]})
    plain["tasks"] = ["depth"]
    assert vb_batch.annotate(plain).success
    ensembled = vb_batch.load_arrays(read_output(str(tmp_path / "out")).sort_by("id"), "depth")
    single = vb_batch.load_arrays(read_output(str(tmp_path / "plain")).sort_by("id"), "depth")
    assert any(not np.allclose(a, b) for a, b in zip(ensembled, single))  # the option changed the call
    bad = job(sample_images, tmp_path / "bad", tiny_marigold, options={"generator": None})
    with pytest.raises(Exception, match="model.options"):
        vb_batch.annotate(bad)


def test_compile_and_half_precision_options(sample_images, tmp_path, tiny_marigold):
    """compile wraps each UNet; half precision on the CPU is refused up front (torch has no CPU bf16 resize)."""
    import torch

    from vb_batch.config import ConfigError, ModelConfig
    from vb_batch.models.base import create_backend

    compiled = create_backend(
        ModelConfig(backend="marigold", path=tiny_marigold, device="cpu", compile=True, channels_last=True)
    )
    assert all(p.unet._compiled_call_impl is not None for p in compiled.pipelines.values())  # compiled on first call
    with pytest.raises(ConfigError, match="model.dtype"):
        create_backend(ModelConfig(backend="marigold", path=tiny_marigold, device="cpu", dtype="bfloat16"))

    # channels_last changes the memory layout only, not the maps.
    conv = next(m for m in compiled.pipelines["depth"].unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for layout in (True, False):
        cfg = job(sample_images, tmp_path / f"cl-{layout}", {"depth": tiny_marigold["depth"]}, channels_last=layout)
        cfg["tasks"], cfg["output"]["encoding"] = ["depth"], "array"
        assert vb_batch.annotate(cfg).success
    fast, plain = (vb_batch.load_arrays(read_output(str(tmp_path / f"cl-{v}")).sort_by("id"), "depth") for v in (True, False))
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, atol=1e-4)
