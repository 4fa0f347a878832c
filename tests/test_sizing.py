"""Working sizes of the edit pipelines: the painting and the condition image are one grid, for every size.

Two levels, both against diffusers' own code:
- the sizing rules (pure arithmetic) over a sweep of 240 input sizes and aspect ratios at several
  working areas, checked against the pipelines' size code (Qwen's `calculate_dimensions`, klein's
  `_resize_to_target_area`, Kontext's preferred resolutions and `max_area` rule);
- tiny random klein, Kontext and Qwen pipelines, loaded as a user's checkpoint is, run through their
  real `__call__` up to the first latents (a spy stops them there) for every size of the sweep
  (which found klein's 8:1 limit: a 352x2864 working size it refused), plus a few full calls
  whose VAE encoder input and painting are compared.

Qwen-Image-Edit always conditions at about 1024**2 px, which a tiny pipeline takes ~20 s to paint
on a CPU; its full calls here shrink that area (the pipeline's own `calculate_dimensions`, called
with a smaller target, and the matching rule), everything else about the call unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vb_batch.config import ConfigError, ModelConfig
from vb_batch.models import diffusers_edit
from vb_batch.models.base import create_backend, resolved_model_settings
from vb_batch.models.sizing import (
    BUCKET_ASPECTS,
    KLEIN_MAX_AREA,
    RULES,
    SizeError,
    bucket_sizes,
    exact_size,
    fixed_points,
    nearest,
    size_for,
)

KLEIN, QWEN, KONTEXT = RULES["Flux2KleinPipeline"], RULES["QwenImageEditPipeline"], RULES["FluxKontextPipeline"]


def sweep(count: int = 240, seed: int = 0) -> list[tuple[int, int]]:
    """(height, width): photo aspects both ways up, panoramas, slivers, tiny and 50 MP images."""
    rng = np.random.default_rng(seed)
    aspects = np.exp(rng.uniform(np.log(1 / 8), np.log(8), count))
    areas = np.exp(rng.uniform(np.log(40 * 40), np.log(50e6), count))
    sizes = [(max(8, round(math.sqrt(a / r))), max(8, round(math.sqrt(a * r)))) for a, r in zip(areas, aspects)]
    return sizes + [(768, 1024), (64, 78), (3000, 4000), (1080, 1920), (4000, 3000), (1024, 1024), (512, 512)]


SIZES = sweep()
assert len(SIZES) >= 200 and len({round(w / h, 2) for h, w in SIZES}) >= 100


def klein_condition(height: int, width: int) -> tuple[int, int]:
    """Flux2KleinPipeline.__call__'s condition-image size, with its own image processor's resize."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    if width * height > 1024 * 1024:
        width, height = Flux2ImageProcessor._resize_to_target_area(Image.new("1", (width, height)), 1024 * 1024).size
    return height // 16 * 16, width // 16 * 16


def qwen_condition(height: int, width: int) -> tuple[int, int]:
    """QwenImageEditPipeline.__call__'s condition size for a first image of this size."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
        calculate_dimensions,
    )

    w, h, _ = calculate_dimensions(1024 * 1024, width / height)
    return h, w


@pytest.mark.parametrize("sizing", ["exact", "buckets"])
@pytest.mark.parametrize("resolution", [512, 1024, 1536])
def test_klein_never_exceeds_its_condition_area(sizing, resolution):
    """The 42% of sizes (all of them at 1536) whose area crept over 1024**2 now round down under it."""
    over = 0
    for height, width in SIZES:
        try:
            h, w = size_for(KLEIN, height, width, resolution, sizing)
        except SizeError:
            assert max(height, width) > 8 * min(height, width)  # only what the pipeline refuses (over 8:1)
            continue
        assert h * w <= KLEIN_MAX_AREA and h % 16 == 0 and w % 16 == 0 and min(h, w) >= 64
        assert max(h, w) <= 8 * min(h, w)  # check_image_input refuses more (the sweep found 352x2864)
        assert klein_condition(h, w) == (h, w)  # the pipeline keeps the condition image as handed
        over += height * width > KLEIN_MAX_AREA
    assert over > 50  # the sweep holds sizes the pipeline would shrink


def test_klein_rule_mirrors_the_pipeline_over_its_limit():
    for height, width in SIZES[:60]:
        assert KLEIN.condition_size(height, width) == klein_condition(height, width)


@pytest.mark.parametrize("sizing", ["exact", "buckets"])
def test_qwen_paints_at_its_condition_size(sizing):
    for height, width in SIZES:
        h, w = size_for(QWEN, height, width, 1024, sizing)
        assert qwen_condition(h, w) == (h, w) == QWEN.condition_size(h, w)
        if sizing == "exact":  # the nearest of Qwen's sizes, about 1 MP, the aspect kept
            assert abs(h * w / 1024**2 - 1) < 0.1 or max(h, w) / min(h, w) > 4
    # The case: a 768x1024 photo conditions at 896x1184; the painting is now that size too.
    assert exact_size(QWEN, 768, 1024, 1024) == (896, 1184) == qwen_condition(768, 1024)


def test_qwen_sizes_are_the_ones_it_keeps():
    """Not every condition size is kept when handed back ((6555, 972) -> (2656, 384) -> (2688, 384)): vb_batch
    uses only sizes Qwen keeps, i.e. every size on its 32-px grid near 1 MP that `calculate_dimensions` returns
    for its own aspect."""
    points = set(fixed_points(QWEN))
    assert all(qwen_condition(h, w) == (h, w) for h, w in points)
    assert qwen_condition(6555, 972) == (2656, 384) and qwen_condition(2656, 384) != (2656, 384)
    grid = {(h, w) for w in range(384, 2720, 32) for h in range(384, 2720, 32)}
    assert {s for s in grid if qwen_condition(*s) == s} == {s for s in points if s in grid}


def test_kontext_buckets_are_its_preferred_resolutions():
    from diffusers.pipelines.flux.pipeline_flux_kontext import (
        PREFERRED_KONTEXT_RESOLUTIONS,
    )

    assert bucket_sizes(KONTEXT, 1024) == tuple((h, w) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    for resolution in (256, 1024):
        for sizing in ("exact", "buckets"):
            for height, width in SIZES:
                h, w = size_for(KONTEXT, height, width, resolution, sizing)
                # FluxKontextPipeline with max_area=h*w: round(sqrt(max_area * aspect)), floored to 16.
                assert (round((h * w / (w / h)) ** 0.5) // 16 * 16, round((h * w * (w / h)) ** 0.5) // 16 * 16) == (h, w)


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 20000), width=st.integers(1, 20000),
    resolution=st.sampled_from([64, 256, 512, 768, 1024, 1536, 2048]),
)
def test_buckets_are_a_small_fixed_set_the_pipelines_keep(height, width, resolution):
    for rule in (KLEIN, KONTEXT):
        buckets = bucket_sizes(rule, resolution)
        assert len(buckets) <= len(BUCKET_ASPECTS)
        assert all(rule.condition_size(h, w) == (h, w) and h % 16 == 0 == w % 16 for h, w in buckets)
        size = size_for(rule, height, width, resolution, "buckets")
        assert size in buckets and size == nearest(buckets, height, width)
        # The nearest aspect: no bucket is closer in log aspect.
        gap = abs(math.log(size[1] / size[0]) - math.log(width / height))
        assert all(gap <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for h, w in buckets)


def test_exact_size_rounds_and_refuses_impossible_slivers():
    assert exact_size(KLEIN, 64, 78, 1024) == (912, 1120)  # was 928x1136, over the limit
    assert exact_size(KLEIN, 768, 1024, 1024) == (880, 1184)
    with pytest.raises(SizeError, match="crop it"):
        exact_size(KLEIN, 10, 20000, 1024)
    with pytest.raises(SizeError, match="over the 8:1 aspect Flux2KleinPipeline takes"):
        exact_size(KLEIN, 100, 801, 1024)
    # Just under 8:1, where rounding to the grid went over it (the sweep through the real pipeline).
    h, w = exact_size(KLEIN, 1000, 7990, 1536)
    assert w <= 8 * h and (h, w) == (352, 2816)


# ---------------------------------------------------------------------------- tiny pipelines


# `tiny` (conftest.py): tiny random edit pipelines by class name, built once per session.


def model_cfg(path, **extra) -> ModelConfig:
    base = {"backend": "diffusers", "path": path, "device": "cpu", "num_inference_steps": 1,
            "options": {"max_sequence_length": 32}}
    return ModelConfig(**{**base, **extra})


class Stop(Exception):
    """Raised by the spy once the pipeline has fixed both sizes: nothing heavy runs."""


def spy(backend) -> dict:
    """Record the condition image and the painting size the pipeline settles on, then stop its call."""
    seen: dict = {}
    pipe = backend.pipe

    def wrap(name):
        original = getattr(pipe, name)
        signature = inspect.signature(original)

        def spied(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            if "height" in bound:
                seen["painting"] = (int(bound["height"]), int(bound["width"]))
            image = bound.get("image", bound.get("images"))
            if image is not None:
                image = image[0] if isinstance(image, list) else image
                seen["condition"] = tuple(image.shape[-2:])
                raise Stop
            return original(*args, **kwargs)

        setattr(pipe, name, spied)

    for name in ("prepare_latents", "prepare_image_latents"):
        if hasattr(pipe, name):
            wrap(name)
    return seen


def small(height: int, width: int) -> tuple[int, int]:
    """A stand-in input of the same aspect, at most ~0.1 MP: the working size depends on the aspect only."""
    scale = min(1.0, math.sqrt(1e5 / (height * width)))
    return max(1, round(height * scale)), max(1, round(width * scale))


def sizes_seen(backend, height, width) -> tuple[tuple, tuple]:
    if not hasattr(backend, "seen"):
        backend.seen = spy(backend)
    seen = backend.seen
    seen.clear()
    image = np.zeros((height, width, 3), np.uint8)
    with pytest.raises(Stop):
        backend.predict([image], ["paint the depth"], "depth", [0])
    return seen["condition"], seen["painting"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline, resolution, sizing",
    [
        ("Flux2KleinPipeline", 1536, "exact"),
        ("Flux2KleinPipeline", 512, "buckets"),
        ("FluxKontextPipeline", 512, "buckets"),
        ("FluxKontextPipeline", 1024, "exact"),
    ],
)
def test_real_pipelines_condition_at_their_painting_size(pipeline, resolution, sizing, tiny):
    """Through the pipeline's own __call__, for every size of the sweep: it conditions at what it paints at."""
    backend = create_backend(model_cfg(tiny(pipeline), processing_resolution=resolution, sizing=sizing))
    checked = 0
    for height, width in [small(h, w) for h, w in SIZES]:
        try:
            expected = backend.size_for(np.zeros((height, width, 3), np.uint8))
        except SizeError:
            assert max(height, width) > 8 * min(height, width)  # klein refuses these itself
            continue
        condition, painting = sizes_seen(backend, height, width)
        assert condition == painting == expected, (height, width)
        checked += 1
    assert checked >= 200


@pytest.fixture
def small_qwen(monkeypatch):
    """Qwen's condition area shrunk to 128**2 in both the pipeline and vb_batch's rule (CPU speed)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    area = 128 * 128
    calculate = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda target_area, ratio: calculate(area, ratio))
    spec = diffusers_edit.EDIT_PIPELINES["QwenImageEditPipeline"]
    monkeypatch.setitem(
        diffusers_edit.EDIT_PIPELINES, "QwenImageEditPipeline",
        dataclasses.replace(spec, rule=dataclasses.replace(spec.rule, fixed_area=area)),
    )


@pytest.mark.slow
def test_qwen_conditions_and_paints_at_one_size(tiny, small_qwen):
    """Qwen without torchvision: image-only processor, CFG on with " ", painting = condition, for mixed aspects."""
    backend = create_backend(model_cfg(tiny("QwenImageEditPipeline"), sizing="exact"))
    assert isinstance(backend.pipe.processor, diffusers_edit.ImageOnlyQwen2VLProcessor) or backend.pipe.processor
    assert backend.settings["true_cfg_scale"] == 4.0 and backend.settings["negative_prompt"] == " "
    assert len(SIZES) >= 200
    for height, width in [small(h, w) for h, w in SIZES]:
        condition, painting = sizes_seen(backend, height, width)
        assert condition == painting == backend.size_for(np.zeros((height, width, 3))), (height, width)
    # Two images, one full call (true CFG: the transformer runs for both branches).
    encoded, branches = [], []
    backend = create_backend(model_cfg(tiny("QwenImageEditPipeline"), sizing="exact"))
    backend.pipe.vae.encoder.register_forward_pre_hook(lambda m, args: encoded.append(tuple(args[0].shape[-2:])))
    backend.pipe.transformer.register_forward_pre_hook(lambda m, args: branches.append(1))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (45, 67, 3), dtype=np.uint8), rng.integers(0, 256, (46, 66, 3), dtype=np.uint8)]
    paintings = backend.predict(images, ["paint the depth"] * 2, "depth", [1, 2])
    assert len(set(encoded)) == 1 and all(p.shape[:2] == encoded[0] for p in paintings)
    assert len(branches) == 2  # one step, true CFG on: positive and negative branch


def test_qwen_refuses_another_resolution(tiny):
    with pytest.raises(ConfigError, match=r"^model\.processing_resolution: 512, but QwenImageEditPipeline"):
        create_backend(model_cfg(tiny("QwenImageEditPipeline"), processing_resolution=512))


@pytest.mark.slow
def test_defaults_read_from_the_checkpoint(tiny, tmp_path):
    """A distilled klein runs 4 steps at guidance 1; the base its pipeline's 50 and 4; each shown with its source.

    Also the full klein calls of this file: painting and condition image of one size.
    """
    import json
    import shutil

    base = resolved_model_settings(model_cfg(tiny("Flux2KleinPipeline"), num_inference_steps=None))
    assert base["num_inference_steps"] == 50 and base["guidance_scale"] == 4.0
    distilled = tmp_path / "distilled"
    shutil.copytree(tiny("Flux2KleinPipeline"), distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    cfg = model_cfg(str(distilled), num_inference_steps=None, processing_resolution=64)
    shown = resolved_model_settings(cfg)
    assert shown["num_inference_steps"] == 4 and shown["guidance_scale"] == 1.0
    assert shown["defaults_from"] == {"num_inference_steps": "checkpoint: is_distilled", "guidance_scale": "checkpoint: is_distilled"}
    backend = create_backend(cfg)
    steps, encoded = [], []
    backend.pipe.transformer.register_forward_pre_hook(lambda m, args: steps.append(1))
    backend.pipe.vae.encoder.register_forward_pre_hook(lambda m, args: encoded.append(tuple(args[0].shape[-2:])))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size + (3,), dtype=np.uint8) for size in [(64, 78), (33, 90)]]
    paintings = backend.predict(images, ["paint the depth"] * 2, "depth", [1, 2])
    assert len(steps) == 2 * 4  # two working sizes, two calls; four steps each, one branch: no guidance
    # Full calls: each painting has the size of the condition image its call encoded.
    assert [p.shape[:2] for p in paintings] == encoded and len(set(encoded)) == 2
    assert resolved_model_settings(model_cfg(str(distilled), guidance_scale=2.5))["defaults_from"]["guidance_scale"] == (
        "model.guidance_scale"
    )
    # The run record keeps what the checkpoint decided (start_run: before any model loads).
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vb_batch.config import JobConfig
    from vb_batch.engines.base import start_run

    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "in.parquet")
    job = JobConfig(input={"path": str(tmp_path / "in.parquet")}, output={"path": str(tmp_path / "out")},
                    model=cfg.model_dump())
    recorded = start_run(job, "local").summary.as_dict()["model_settings"]
    assert recorded["num_inference_steps"] == 4 and recorded["defaults_from"] == shown["defaults_from"]
    qwen = resolved_model_settings(model_cfg(tiny("QwenImageEditPipeline"), num_inference_steps=None))
    assert qwen["true_cfg_scale"] == 4.0 and qwen["negative_prompt"] == " " and qwen["num_inference_steps"] == 50
    assert len(qwen["buckets"]) == len(BUCKET_ASPECTS)
    # A hub id not in local files: never downloaded at validate time, and said so.
    assert "not in local files" in resolved_model_settings(model_cfg("no-such-org/no-such-model"))["checkpoint"]


def test_validate_prints_the_resolved_defaults(tiny, tmp_path, capsys):
    """`vb-batch validate` shows what the checkpoint decided, under model_resolved (read from local files only)."""
    import json

    from vb_batch.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'in.parquet'}}}\n"
        f"model: {{backend: diffusers, path: {tiny('Flux2KleinPipeline')}, processing_resolution: 512}}\n"
    )
    assert main(["validate", str(job)]) == 0
    shown = json.loads(capsys.readouterr().out)["model_resolved"]
    assert shown["pipeline"] == "Flux2KleinPipeline" and shown["num_inference_steps"] == 50
    assert shown["sizing"] == "buckets" and [880, 288] in shown["buckets"]
    assert all(h * w <= 1024 * 1024 and h % 16 == 0 == w % 16 for h, w in shown["buckets"])
    job.write_text(
        f"input: {{path: {tmp_path / 'in.parquet'}}}\n"
        f"model: {{backend: diffusers, path: {tiny('QwenImageEditPipeline')}, processing_resolution: 512}}\n"
    )
    assert main(["validate", str(job)]) == 2  # Qwen paints at its own ~1 MP: the field is named
    assert "model.processing_resolution: 512" in capsys.readouterr().err
