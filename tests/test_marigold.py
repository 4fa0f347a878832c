"""The tiny Marigold pipelines through the real `from_pretrained` path and the whole local pipeline."""

from __future__ import annotations

import numpy as np
import pytest

import vb_batch
from vb_batch.cli import main
from vb_batch.demo import make_sample_images
from vb_batch.io.outputs import read_output

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


def test_depth_and_normals_share_one_vae_encode(tmp_path, tiny_marigold):
    """Equal VAEs (Marigold trains the UNet only) are loaded once and encode each batch once for both tasks."""
    from vb_batch.config import ModelConfig
    from vb_batch.models.base import create_backend

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import png_bytes

    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(8)]
    pq.write_table(pa.table({"id": list(range(8)), "image": images}), tmp_path / "in.parquet")
    backend = create_backend(ModelConfig(backend="marigold", path=tiny_marigold, device="cpu"))
    assert backend.pipelines["depth"].vae is backend.pipelines["normals"].vae
    cfg = job(tmp_path / "in.parquet", tmp_path / "both", tiny_marigold, batch_size=4)
    cfg["output"]["encoding"] = "array"
    assert vb_batch.annotate(cfg, backend=backend).success
    assert backend.shared_encoder.encodes == 2  # 2 batches of one size, 2 tasks: one encode per batch
    # The same maps as each task's pipeline alone (no sharing with one task).
    both = read_output(str(tmp_path / "both")).sort_by("id")
    for task in ("depth", "normals"):
        alone = job(tmp_path / "in.parquet", tmp_path / task, {task: tiny_marigold[task]}, batch_size=4)
        alone["tasks"], alone["output"]["encoding"] = [task], "array"
        assert vb_batch.annotate(alone).success
        single = read_output(str(tmp_path / task)).sort_by("id")
        for a, b in zip(vb_batch.load_arrays(both, task), vb_batch.load_arrays(single, task)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_different_vaes_are_not_shared(tmp_path, tiny_marigold):
    from vb_batch.config import ModelConfig
    from vb_batch.models.base import create_backend
    from vb_batch.models.tiny import build_tiny_marigold

    other = build_tiny_marigold(tmp_path / "normals-seed-1", task="normals", seed=1)
    backend = create_backend(
        ModelConfig(backend="marigold", path={"depth": tiny_marigold["depth"], "normals": str(other)}, device="cpu")
    )
    assert backend.shared_encoder is None
    assert backend.pipelines["depth"].vae is not backend.pipelines["normals"].vae


def test_shared_encoder_reuses_only_the_same_call():
    import torch

    from vb_batch.models.marigold import SharedEncoder

    encoder = SharedEncoder(lambda sample: sample * 2)
    first, second = torch.ones(2, 3), torch.full((2, 3), 5.0)
    with encoder.call("batch-1"):  # two chunks of one pipeline call, same shape, other pixels
        assert torch.equal(encoder(first), first * 2) and torch.equal(encoder(second), second * 2)
    with encoder.call("batch-1"):  # the other task's call on the same batch: both chunks reused
        assert torch.equal(encoder(first), first * 2) and torch.equal(encoder(second), second * 2)
    assert encoder.encodes == 2
    with encoder.call("batch-2"):
        assert torch.equal(encoder(second), second * 2)
    assert encoder.encodes == 3
    encoder(first)  # outside a call: never cached
    encoder(first)
    assert encoder.encodes == 5


def test_ensembled_labels_do_not_depend_on_batching(tiny_marigold):
    """With ensemble_size > 1 an image's members run together and alone: batch 8 and batch 1 agree within 1e-5.

    (Batched with other images, diffusers' ensembling fit amplified ~1e-7 float differences up to 0.18.)
    Depth: its fit (a scale and shift per member) is where the amplification happened; normals take the
    same code path.
    """
    from vb_batch.config import ModelConfig
    from vb_batch.models.base import create_backend

    cfg = ModelConfig(
        backend="marigold", path=tiny_marigold["depth"], device="cpu", processing_resolution=32,
        options={"ensemble_size": 3},
    )
    backend = create_backend(cfg)
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 24 * 32).reshape(24, 32, 1)
    images = [np.clip(gradient + rng.normal(0, 40, (24, 32, 3)), 0, 255).astype(np.uint8) for _ in range(8)]
    seeds = [101 * i for i in range(8)]
    together = backend.predict(images, [""] * 8, "depth", seeds)
    (alone,) = backend.predict(images[5:6], [""], "depth", seeds[5:6])
    assert np.nanmax(np.abs(alone - together[5])) < 1e-5
    (reseeded,) = backend.predict(images[5:6], [""], "depth", [7])
    assert np.nanmax(np.abs(reseeded - together[5])) > 1e-3  # the members' noise matters: the test can fail
