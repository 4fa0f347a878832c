"""The `diffusers` backend on tiny random edit pipelines, saved and loaded the way a user's checkpoint is.

Each pipeline class is built from configs (vb_batch.models.tiny), `save_pretrained` to a
temporary directory, and loaded by the backend through `from_pretrained` from the path in a
job config; nothing is downloaded. Random weights paint noise, so these tests check shapes,
batching, seeds, labelling and errors, not label quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import png_bytes
from transformers.utils import is_torchvision_available

import vb_batch
from vb_batch.codecs import depth as depth_codec
from vb_batch.config import ConfigError, ModelConfig, load_config
from vb_batch.io.outputs import read_output
from vb_batch.models.base import create_backend, model_id
from vb_batch.models.diffusers_edit import working_size
from vb_batch.models.tiny import build_tiny_flux2_klein, build_tiny_marigold
from vb_batch.stages import Plan

pytestmark = pytest.mark.slow

PIPELINES = ["Flux2KleinPipeline", "FluxKontextPipeline"]
# Mixed sizes, most of them not multiples of 16; some share a working size at resolution 64.
SIZES = [(40, 56), (64, 64), (45, 67), (33, 90), (40, 56)]


# `tiny` (conftest.py): tiny random edit pipelines by class name, built once per session.


def images_of(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def model_cfg(path, **extra) -> ModelConfig:
    # Toy speed: one step, short prompts (the tiny tokenizers spend a token per character).
    base = {
        "backend": "diffusers", "path": path, "device": "cpu", "processing_resolution": 64, "num_inference_steps": 1,
        "options": {"max_sequence_length": 64},
    }
    return ModelConfig(**{**base, **extra})


def test_working_size_keeps_aspect_and_multiple():
    assert working_size(768, 1024, 1024, 16) == (880, 1184)
    assert working_size(45, 67, 64, 16) == (48, 80)
    assert working_size(45, 67, 0, 16) == (48, 64)  # 0: the input's own area
    assert working_size(40, 56, 64, 16, min_side=64) == (64, 96)  # Klein's smallest side
    for h, w in [(31, 500), (1000, 7), (16, 16), (3, 3)]:
        height, width = working_size(h, w, 256, 16)
        assert height % 16 == 0 and width % 16 == 0 and height >= 16 and width >= 16


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_job_config_gives_decoded_columns_at_input_sizes(pipeline, tiny, tmp_path):
    """A YAML job as a user writes it: every row comes back with depth, normals and classes at its input size."""
    check_job_config(pipeline, tiny, tmp_path)


def test_qwen_image_edit_loads_without_torchvision(tiny):
    """Qwen-Image-Edit loads from its real checkpoint layout, torchvision or not (image-only Qwen2-VL processor).

    It conditions at ~1 MP whatever the input, so a working size of 64 is refused; its full calls run in
    tests/test_sizing.py at a shrunk condition area (a 1 MP tiny call takes ~20 s on a CPU).
    """
    from vb_batch.models.diffusers_edit import ImageOnlyQwen2VLProcessor

    backend = create_backend(model_cfg(tiny("QwenImageEditPipeline"), processing_resolution=None))
    if not is_torchvision_available():
        assert isinstance(backend.pipe.processor, ImageOnlyQwen2VLProcessor)
    assert backend.size_for(np.zeros((768, 1024, 3), np.uint8)) == (896, 1184)  # Qwen's own condition size
    with pytest.raises(ConfigError, match=r"^model\.processing_resolution: 64, but QwenImageEditPipeline"):
        create_backend(model_cfg(tiny("QwenImageEditPipeline")))


def check_job_config(pipeline, tiny, tmp_path):
    ids = [f"img{i}" for i in range(len(SIZES))]
    table = pa.table({"id": ids, "image": pa.array([png_bytes(im) for im in images_of(SIZES)], pa.binary())})
    pq.write_table(table, tmp_path / "in.parquet")
    profile = "open-vision-banana" if pipeline == "Flux2KleinPipeline" else "vision-banana"
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""
input: {{path: {tmp_path / 'in.parquet'}, image_column: image}}
output: {{path: {tmp_path / 'out'}, mode: overwrite, encoding: array}}
tasks: [depth, normals, segmentation]
segmentation: {{classes: [road, car, sky]}}
model:
  backend: diffusers
  path: {tiny(pipeline)}
  profile: {profile}
  device: auto
  batch_size: 4
  processing_resolution: 64
  num_inference_steps: 1
  options: {{max_sequence_length: 64}}
run: {{progress: false}}
"""
    )
    summary = vb_batch.annotate(str(job))
    assert summary.success and summary.rows_ok == len(SIZES), summary.render()
    out = read_output(str(tmp_path / "out"))
    by_id = {row_id: i for i, row_id in enumerate(out.column("id").to_pylist())}
    depth, normals, classes = (vb_batch.load_arrays(out, c) for c in ("depth", "normals", "segmentation"))
    for i, size in enumerate(SIZES):
        row = by_id[f"img{i}"]
        assert depth[row].shape == size and depth[row].dtype == np.float32
        assert normals[row].shape == (*size, 3)
        norms = np.linalg.norm(normals[row], axis=-1)  # NaN: the codec's "no direction" (mid-grey) pixels
        assert np.isfinite(norms).mean() > 0.5 and np.allclose(norms[np.isfinite(norms)], 1, atol=1e-3)
        assert classes[row].shape == size
        assert set(np.unique(classes[row])) <= {0, 1, 2, 255}
    assert out.column("vb_error").null_count == len(SIZES)
    assert set(out.column("vb_model").to_pylist()) == {f"diffusers:{tiny(pipeline)}"}
    unit = out.schema.field("depth").metadata[b"vb.unit"]
    if profile == "open-vision-banana":
        # Relative depth: labelled and summarised as relative, never as metres.
        assert unit.startswith(b"relative") and "depth_median_rel" in out.column_names
        assert not any(name.endswith("_m") for name in out.column_names)
    else:
        assert unit == b"m" and "depth_median_m" in out.column_names


@pytest.mark.parametrize("pipeline", ["Flux2KleinPipeline", "FluxKontextPipeline"])
def test_equal_working_sizes_share_one_model_call(pipeline, tiny):
    backend = create_backend(model_cfg(tiny(pipeline)))
    batch_sizes = []
    backend.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    images = images_of(SIZES)
    paintings = backend.predict(images, ["paint the depth"] * len(images), "depth", list(range(len(images))))
    assert len(paintings) == len(images)
    working = [backend.size_for(im) for im in images]
    for painting, size in zip(paintings, working):
        # Paintings stay at the working size: the decode stage resizes values, never colours.
        assert painting.shape == (*size, 3) and painting.dtype == np.uint8
    buckets = [working.count(size) for size in set(working)]
    assert max(buckets) > 1, "the sizes were meant to share working sizes"
    # Each bucket is one batch through the transformer (once per step and guidance branch).
    calls_per_bucket = len(batch_sizes) // len(buckets)
    assert sorted(batch_sizes) == sorted(b for b in buckets for _ in range(calls_per_bucket))


@pytest.mark.parametrize("pipeline", ["Flux2KleinPipeline", "FluxKontextPipeline"])
def test_labels_do_not_depend_on_batching(pipeline, tiny):
    backend = create_backend(model_cfg(tiny(pipeline)))
    images = images_of([(48, 64)] * 2, seed=1)
    prompts = ["paint the depth", "segment: a = (255, 0, 0)"]
    seeds = [11, 22]
    together = backend.predict(images, prompts, "depth", seeds)
    alone = [backend.predict([im], [p], "depth", [s])[0] for im, p, s in zip(images, prompts, seeds)]
    for a, b in zip(together, alone):
        # Same image, prompt and seed: the same painting, up to float reduction order.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    reseeded = backend.predict(images[:1], prompts[:1], "depth", [12])[0]
    assert np.abs(reseeded.astype(int) - together[0].astype(int)).max() > 2  # the seed matters


def test_klein_encodes_each_prompt_once(tiny):
    """A job repeats its prompts: klein's text encoder runs once per distinct prompt, with the same paintings."""
    backend = create_backend(model_cfg(tiny("Flux2KleinPipeline")))
    fresh = create_backend(model_cfg(tiny("Flux2KleinPipeline")))
    encoded: list[int] = []
    backend.pipe.text_encoder.register_forward_hook(
        lambda module, args, kwargs, out: encoded.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    images = images_of([(48, 64)] * 3, seed=2)
    prompts = ["paint the depth", "paint the normals", "paint the depth"]
    first = backend.predict(images, prompts, "depth", [1, 2, 3])
    # The two distinct prompts in one encoder call (then klein's empty negative prompt, for its guidance).
    assert encoded[0] == 2 and sum(encoded) <= 3
    calls = len(encoded)
    again = backend.predict(images, prompts, "depth", [1, 2, 3])
    assert len(encoded) == calls  # served from the cache
    for a, b, c in zip(first, again, fresh.predict(images, prompts, "depth", [1, 2, 3])):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a.astype(int) - c.astype(int)).max() <= 2  # an uncached pipeline paints the same


def test_open_vision_banana_transformer_loads_over_the_base(tiny, tmp_path):
    """Open Vision Banana: the klein base pipeline with a fine-tuned transformer from another repo's subfolder."""
    from diffusers import Flux2Transformer2DModel

    finetuned = build_tiny_flux2_klein(tmp_path / "ovb", seed=7, transformer_only=True)
    cfg = model_cfg(tiny("Flux2KleinPipeline"), transformer_path=str(finetuned), transformer_subfolder="transformer")
    backend = create_backend(cfg)
    expected = Flux2Transformer2DModel.from_pretrained(finetuned, subfolder="transformer").state_dict()
    loaded = backend.pipe.transformer.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert model_id(cfg) == f"diffusers:{tiny('Flux2KleinPipeline')}+transformer={finetuned}/transformer"
    assert backend.predict(images_of([(64, 64)]), ["paint the depth"], "depth", [0])[0].shape == (64, 64, 3)


def test_missing_weights_offline_name_the_field(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^model\.path: .*does not exist"):
        create_backend(model_cfg(str(tmp_path / "no-such-model")))
    with pytest.raises(ConfigError, match=r"^model\.path: cannot load 'FunAILab/Open-Vision-Banana'.*local files"):
        create_backend(model_cfg("FunAILab/Open-Vision-Banana"))
    # A checkpoint whose transformer is a pickle (.bin) is refused: safetensors only.
    unsafe = tmp_path / "unsafe"
    shutil.copytree(tiny("FluxKontextPipeline"), unsafe)
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(unsafe / "transformer")
    shutil.rmtree(unsafe / "transformer")
    transformer.save_pretrained(unsafe / "transformer", safe_serialization=False)
    with pytest.raises(ConfigError, match=r"^model\.path: cannot load"):
        create_backend(model_cfg(str(unsafe)))
    with pytest.raises(ConfigError, match=r"^model\.transformer_path: .*does not exist"):
        create_backend(model_cfg(tiny("Flux2KleinPipeline"), transformer_path=str(tmp_path / "none"), transformer_subfolder="t"))


def test_wrong_checkpoint_and_reserved_options_are_config_errors(tiny, tmp_path):
    marigold = build_tiny_marigold(tmp_path / "marigold")
    with pytest.raises(ConfigError, match=r"model\.path: .*MarigoldDepthPipeline.*model\.backend: marigold"):
        create_backend(model_cfg(str(marigold)))
    with pytest.raises(ConfigError, match=r"^model\.options: \['generator', 'image'\]"):
        create_backend(model_cfg(tiny("FluxKontextPipeline"), options={"image": None, "generator": None}))
    with pytest.raises(ConfigError, match=r"^model\.path: the diffusers backend needs one checkpoint"):
        create_backend(model_cfg({"depth": tiny("FluxKontextPipeline")}))


def test_memory_and_speed_options_reach_the_pipeline(tiny):
    backend = create_backend(model_cfg(tiny("FluxKontextPipeline"), vae_slicing=True, vae_tiling=True, compile=True))
    assert backend.pipe.vae.use_slicing and backend.pipe.vae.use_tiling
    assert backend.pipe.transformer._compiled_call_impl is not None  # compiled lazily, on the first (GPU) call
    plain = create_backend(model_cfg(tiny("FluxKontextPipeline")))
    assert not plain.pipe.vae.use_slicing and plain.pipe.transformer._compiled_call_impl is None


def test_segmentation_ensemble_through_a_profile(tiny, tmp_path):
    pq.write_table(
        pa.table({"id": [1, 2], "image": [png_bytes(im) for im in images_of([(40, 56), (45, 67)])]}), tmp_path / "in.parquet"
    )
    checkpoint = tiny("FluxKontextPipeline")
    backend = create_backend(model_cfg(checkpoint))
    prompts = []
    predict = backend.predict

    def recording_predict(images, batch_prompts, task, seeds):
        prompts.extend(batch_prompts)
        return predict(images, batch_prompts, task, seeds)

    backend.predict = recording_predict
    config = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "encoding": "array"},
        "tasks": ["segmentation"],
        # Five classes: with fewer, Legend.permuted(1) is the identity and two passes would ask alike.
        "segmentation": {"classes": ["road", "car", "sky", "person", "tree"], "ensemble": 3},
        # The instance runs; the config still names its checkpoint (provenance, and validation needs one).
        "model": {"backend": "diffusers", "path": str(checkpoint), "profile": "open-vision-banana"},
        "run": {"progress": False},
    }
    assert vb_batch.annotate(config, backend=backend).success
    assert len(prompts) == 6 and len(set(prompts)) == 3  # one permuted legend per pass
    out = read_output(str(tmp_path / "out")).sort_by("id")
    assert [m.shape for m in vb_batch.load_arrays(out, "segmentation")] == [(40, 56), (45, 67)]
    confidence = np.array(out.column("segmentation_confidence").to_pylist())
    assert np.all((confidence >= 0) & (confidence <= 1))


def test_relative_depth_paintings_survive_png_storage(tmp_path):
    """A painting at the middle of the walk is a finite relative depth after PNG storage, not 'far'."""
    middle = depth_codec.unsquash(0.5, "open-vision-banana")  # the depth the walk paints at f = 0.5
    painting = depth_codec.encode(np.full((16, 16), middle), "open-vision-banana")
    pq.write_table(pa.table({"id": [1], "image": [png_bytes(painting)]}), tmp_path / "in.parquet")
    config = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "encoding": "png"},
        "model": {"backend": "identity", "profile": "open-vision-banana"},
        "run": {"progress": False},
    }
    assert vb_batch.annotate(config).success
    (values,) = vb_batch.load_arrays(read_output(str(tmp_path / "out")), "depth")
    assert np.all(np.isfinite(values)) and np.all((values >= 0) & (values <= 1))
    assert np.allclose(values, 0.5, atol=1 / (7 * 255))  # the walk position, to one 8-bit step


@pytest.mark.parametrize("name, relative", [("open-vision-banana", True), ("http", False), ("marigold", True)])
def test_example_configs_resolve(name, relative):
    """The configs users copy validate, and their profiles label depth as they should."""
    cfg = load_config(Path(__file__).parent.parent / "conf" / f"{name}.yaml")
    plan = Plan.build(cfg, pa.schema([("id", pa.string()), ("image", pa.binary())]), image_column="image")
    assert plan.profile == cfg.model.profile and plan.ctx.depth_relative == relative
    assert plan.ctx.ensemble == cfg.segmentation.ensemble
