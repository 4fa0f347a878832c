"""The `diffusers` backend: instruction-edit pipelines that paint their answer (image + prompt -> image).

The pipeline class is read from `model_index.json` of `model.path` (a local
directory or a hub id); these run:

    Flux2KleinPipeline     FLUX.2 [klein]. Open Vision Banana is the klein base with its
                           fine-tuned transformer: `model.transformer_path` (+ `_subfolder`)
    QwenImageEditPipeline  Qwen-Image-Edit (without torchvision, its Qwen2-VL processor loads image-only)
    FluxKontextPipeline    FLUX.1 Kontext

How a batch runs:

1. Each image is resized (bicubic: it is a photo) to its working size, a size
   the pipeline's own condition resize leaves alone, so that the painting and
   the condition image are one grid (`vb_batch.models.sizing`: klein stays
   within its 1024**2 condition area, Qwen paints at its ~1 MP condition size).
   `model.sizing: buckets` (the default) picks the nearest of a small fixed set
   of working sizes by aspect ratio; `exact` keeps each image's own aspect.
2. Images of one working size make one pipeline call, with one
   `torch.Generator` per image seeded from its row: an image's label does not
   depend on what it was batched with, nor on the device (CPU generators).
3. The painting comes back at the working size, untouched. The decode stage
   decodes its colours first and then maps the values to the input size
   (nearest for class ids): resampling a painting would blend legend colours
   into the colours of other classes.

Steps and guidance left unset are read from the checkpoint (`resolved_settings`):
a step-distilled klein (`is_distilled: true` in its model_index.json) runs 4
steps at guidance 1; Qwen-Image-Edit runs its true CFG (scale 4) with the
negative prompt " "; otherwise the pipeline's own defaults. `vb-batch validate`
shows them.

Loading is safetensors only, never remote code; `HF_HUB_OFFLINE=1` (or a
local directory) loads from local files only, and missing weights are a
`ConfigError` naming `model.path`.

Example (a job config):

    model:
      backend: diffusers
      path: black-forest-labs/FLUX.2-klein-base-4B
      transformer_path: FunAILab/Open-Vision-Banana
      transformer_subfolder: transformer
      profile: open-vision-banana
      dtype: bfloat16
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, FluxKontextPipeline, QwenImageEditPipeline
from PIL import Image

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from vb_batch.config import ConfigError
from vb_batch.errors import RowError
from vb_batch.models.base import ModelBackend, public_url
from vb_batch.models.options import DiffusersOptions
from vb_batch.models.preflight import checkpoint_checks
from vb_batch.models.loading import (
    compile_denoiser, from_pretrained, load_error, local_only, quiet_loading, resolve_device, use_channels_last,
)
from vb_batch.models.sizing import RULES, SizeError, SizingRule, bucket_sizes, size_for, working_size  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_RESOLUTION = 1024


class Flux2KleinBatchPipeline(Flux2KleinPipeline):
    """`Flux2KleinPipeline` where the list of images pairs with the list of prompts.

    Klein reads a list of images as *references shared by every prompt* (multi-
    reference editing). A batch of edits needs image i to condition prompt i
    only: the same tokens and positions as a call with that one image, which
    is what this `prepare_image_latents` builds. Loaded from the same
    checkpoint as its parent class.

    A batch job asks the same few prompts over and over (one per task), so
    `encode_prompt` keeps the text encoder's output per prompt: each prompt is
    padded to the full sequence on its own, so its embedding does not depend on
    what it is batched with. At full size the text encoder is about 4 of klein's
    ~170 TFLOP per image (benchmarks/bench_gpu.py).
    """

    PROMPT_CACHE_SIZE = 16  # one entry is max_sequence_length x 7680 values (~8 MB in bf16 at full size)

    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, prompt_embeds=None,
                      max_sequence_length=512, text_encoder_out_layers=(9, 18, 27)):
        if prompt_embeds is None:
            prompts = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
            settings = (max_sequence_length, tuple(text_encoder_out_layers))
            cache = self.__dict__.setdefault("_prompt_cache", OrderedDict())
            missing = [p for p in dict.fromkeys(prompts) if (p, settings) not in cache]
            if missing:
                embeds = self._get_qwen3_prompt_embeds(
                    text_encoder=self.text_encoder, tokenizer=self.tokenizer, prompt=missing,
                    device=device or self._execution_device, max_sequence_length=max_sequence_length,
                    hidden_states_layers=text_encoder_out_layers,
                )
                cache.update({(p, settings): e for p, e in zip(missing, embeds)})
            for p in prompts:
                cache.move_to_end((p, settings))
            prompt_embeds = torch.stack([cache[(p, settings)] for p in prompts])
            while len(cache) > self.PROMPT_CACHE_SIZE:
                cache.popitem(last=False)
        return super().encode_prompt(
            prompt, device, num_images_per_prompt, prompt_embeds, max_sequence_length, text_encoder_out_layers
        )

    def prepare_image_latents(self, images, batch_size, generator, device, dtype):
        if len(images) != batch_size:
            raise ValueError(f"one image per prompt: got {len(images)} images for {batch_size} prompts")
        vae_device = self.vae.device
        pixels = torch.cat([image.to(device=vae_device, dtype=dtype) for image in images])
        latents = self._encode_vae_image(image=pixels, generator=generator)  # (B, C, h, w)
        latent_ids = self._prepare_image_ids([latents[:1]])  # one reference's positions, (1, h*w, 4)
        packed = self._pack_latents(latents)  # (B, h*w, C)
        return packed.to(device), latent_ids.repeat(batch_size, 1, 1).to(device)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """transformers' `Qwen2VLProcessor` without its video processor, which needs torchvision.

    Qwen-Image-Edit gives its Qwen2.5-VL text encoder images only. Where torchvision is
    missing, the backend loads the checkpoint's `processor/` folder as this class, with
    the PIL image processor (`Qwen2VLImageProcessorPil`): same resize and patching rules.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Qwen2VLProcessor.__init__ would add a video processor; the mixin takes the attributes of this __init__.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_image_only_qwen_processor(cfg, offline: bool) -> ImageOnlyQwen2VLProcessor:
    """The checkpoint's `processor/` (tokenizer + image processor) as an `ImageOnlyQwen2VLProcessor`."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            cfg.path, subfolder="processor", revision=cfg.revision, local_files_only=offline
        )
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.path, subfolder="processor", revision=cfg.revision, local_files_only=offline
        )
    except (OSError, ValueError) as exc:
        raise load_error("model.path", cfg.path, exc, offline) from exc
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


@dataclass(frozen=True)
class EditPipeline:
    """How to drive one pipeline class: what to load, its sizing rule, its guidance, extra call arguments."""

    load_as: type
    guidance_arg: str
    rule: SizingRule
    call_kwargs: Callable[[int, int], dict[str, Any]] | None = None  # (height, width) -> extra arguments
    negative_prompt: str | None = None  # true CFG runs only with a negative prompt (Qwen)


EDIT_PIPELINES: dict[str, EditPipeline] = {
    # Klein refuses condition images under 64 px a side and shrinks those over 1024**2 px.
    "Flux2KleinPipeline": EditPipeline(Flux2KleinBatchPipeline, "guidance_scale", RULES["Flux2KleinPipeline"]),
    # Qwen's true CFG (scale 4 by default) runs only with a negative prompt: " " as diffusers' examples give.
    "QwenImageEditPipeline": EditPipeline(
        QwenImageEditPipeline, "true_cfg_scale", RULES["QwenImageEditPipeline"], negative_prompt=" "
    ),
    # Kontext would snap to its preferred ~1 MP sizes; the working size is already chosen.
    "FluxKontextPipeline": EditPipeline(
        FluxKontextPipeline,
        "guidance_scale",
        RULES["FluxKontextPipeline"],
        call_kwargs=lambda height, width: {"max_area": height * width, "_auto_resize": False},
    ),
}
# Step-distilled FLUX.2 [klein] checkpoints run at 4 steps without guidance (BFL's model cards).
DISTILLED_STEPS, DISTILLED_GUIDANCE = 4, 1.0
# Call arguments the backend sets itself; `model.options` may not override them.
RESERVED_OPTIONS = {
    "image", "prompt", "height", "width", "generator", "output_type", "return_dict", "num_images_per_prompt",
}


def resolved_settings(cfg, index: dict | None = None) -> dict[str, Any]:
    """What a diffusers job runs with: steps, guidance, negative prompt, sizing, each default resolved.

    `index` is the checkpoint's model_index.json (the loaded pipeline's config); None: read from
    local files only (never a download), and said so when they are not there.
    """
    if index is None:
        try:
            index = DiffusionPipeline.load_config(cfg.path, revision=cfg.revision, local_files_only=True)
        except (OSError, ValueError, TypeError):
            return {"checkpoint": "not in local files: steps and guidance are resolved when the model loads"}
    class_name = index.get("_class_name")
    spec = EDIT_PIPELINES.get(class_name)
    if spec is None:
        return {"pipeline": class_name}
    defaults = inspect.signature(spec.load_as.__call__).parameters
    steps, guidance = defaults["num_inference_steps"].default, defaults[spec.guidance_arg].default
    source = "pipeline default"
    if class_name == "Flux2KleinPipeline" and index.get("is_distilled"):
        steps, guidance, source = DISTILLED_STEPS, DISTILLED_GUIDANCE, "checkpoint: is_distilled"
    settings: dict[str, Any] = {"pipeline": class_name}
    settings["num_inference_steps"] = cfg.num_inference_steps or steps
    settings[spec.guidance_arg] = guidance if cfg.guidance_scale is None else cfg.guidance_scale
    settings["defaults_from"] = {
        "num_inference_steps": "model.num_inference_steps" if cfg.num_inference_steps else source,
        spec.guidance_arg: "model.guidance_scale" if cfg.guidance_scale is not None else source,
    }
    if spec.negative_prompt is not None and settings[spec.guidance_arg] > 1:
        settings["negative_prompt"] = cfg.options.get("negative_prompt", spec.negative_prompt)
    resolution = working_resolution(cfg, spec)
    settings["sizing"] = cfg.sizing
    settings["processing_resolution"] = resolution
    if spec.rule.max_area:
        settings["max_condition_area"] = spec.rule.max_area
    if spec.rule.fixed_area:
        settings["condition_area"] = spec.rule.fixed_area
    if cfg.sizing == "buckets":
        settings["buckets"] = [list(size) for size in bucket_sizes(spec.rule, resolution)]
    return settings


def working_resolution(cfg, spec: EditPipeline) -> int:
    """`model.processing_resolution` for this pipeline (None: 1024); Qwen takes nothing but its own ~1 MP."""
    resolution = DEFAULT_RESOLUTION if cfg.processing_resolution is None else cfg.processing_resolution
    if spec.rule.fixed_area and resolution != DEFAULT_RESOLUTION:
        raise ConfigError(
            f"model.processing_resolution: {resolution}, but QwenImageEditPipeline always conditions at about "
            "1024**2 px and vb_batch paints at that size; leave it unset (or 1024)"
        )
    if cfg.sizing == "buckets" and not resolution:
        raise ConfigError("model.sizing: buckets need a working area; set model.processing_resolution, or sizing: exact")
    return resolution


def load_edit_pipeline(cfg) -> tuple[Any, EditPipeline]:
    """Load `model.path` (plus a fine-tuned transformer) as its instruction-edit pipeline class."""
    quiet_loading()
    if not isinstance(cfg.path, str) or not cfg.path:
        raise ConfigError("model.path: the diffusers backend needs one checkpoint (a local directory or hub id)")
    offline = local_only(cfg.path, "model.path")
    try:
        index = DiffusionPipeline.load_config(cfg.path, revision=cfg.revision, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise load_error("model.path", cfg.path, exc, offline) from exc
    class_name = index.get("_class_name")
    spec = EDIT_PIPELINES.get(class_name)
    if spec is None:
        hint = "; use model.backend: marigold" if str(class_name).startswith("Marigold") else ""
        raise ConfigError(
            f"model.path: {cfg.path!r} holds a {class_name}; the diffusers backend runs {sorted(EDIT_PIPELINES)}{hint}"
        )
    working_resolution(cfg, spec)  # a refused resolution fails before the weights load
    dtype = getattr(torch, cfg.dtype)
    components = {}
    if class_name == "QwenImageEditPipeline":
        from transformers.utils import is_torchvision_available

        if not is_torchvision_available():
            components["processor"] = load_image_only_qwen_processor(cfg, offline)
    if cfg.transformer_path or cfg.transformer_subfolder:
        library, transformer_class = index["transformer"]
        if library != "diffusers":
            raise ConfigError(f"model.transformer_path: the pipeline's transformer is a {library}.{transformer_class}")
        source = cfg.transformer_path or cfg.path
        components["transformer"] = from_pretrained(
            getattr(diffusers, transformer_class), source, "model.transformer_path",
            shown=f"{source}/{cfg.transformer_subfolder or ''}".rstrip("/"),
            subfolder=cfg.transformer_subfolder, revision=cfg.transformer_revision, dtype=dtype,
        )
    pipe = from_pretrained(spec.load_as, cfg.path, "model.path", revision=cfg.revision, dtype=dtype, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec


class DiffusersEditBackend(ModelBackend):
    name = "diffusers"
    # Conservative: a relative profile never claims metres; pick a metric profile for a metric model.
    default_profile = "open-vision-banana"
    options_model = DiffusersOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        reserved = sorted(RESERVED_OPTIONS & set(cfg.options))
        if reserved:
            raise ConfigError(f"model.options: {reserved} are set by the diffusers backend itself")
        self.pipe, self.spec = load_edit_pipeline(cfg)
        self.device = resolve_device(cfg.device)
        self.pipe.to(self.device)
        if cfg.vae_slicing:
            self.pipe.vae.enable_slicing()
        if cfg.vae_tiling:
            self.pipe.vae.enable_tiling()
        if cfg.channels_last:
            use_channels_last(self.pipe)
        if cfg.compile:
            compile_denoiser(self.pipe)
        if self.pipe.vae_scale_factor * 2 != self.spec.rule.multiple:
            raise ConfigError(
                f"model.path: {cfg.path!r} has a {self.pipe.vae_scale_factor * 2}-px latent patch; "
                f"vb_batch sizes {type(self.pipe).__name__} on a {self.spec.rule.multiple}-px grid"
            )
        self.multiple = self.spec.rule.multiple
        self.resolution = working_resolution(cfg, self.spec)
        class_name = next(name for name, spec in EDIT_PIPELINES.items() if spec is self.spec)
        self.settings = resolved_settings(cfg, {**self.pipe.config, "_class_name": class_name})

    @classmethod
    def resolved_settings(cls, cfg) -> dict[str, Any]:
        return resolved_settings(cfg)

    @classmethod
    def working_resolution(cls, cfg) -> int | None:
        # Every edit pipeline paints at about processing_resolution**2 px; 0: the input's own size.
        resolution = cfg.processing_resolution
        return None if resolution == 0 else resolution or DEFAULT_RESOLUTION

    @classmethod
    def provenance(cls, cfg) -> str:
        """The checkpoint, plus `+transformer=<path>[/<subfolder>][@<revision>]` for a fine-tuned transformer."""
        source = super().provenance(cfg)
        if not (cfg.transformer_path or cfg.transformer_subfolder):
            return source
        transformer = public_url(cfg.transformer_path or cfg.path).rstrip("/")
        if cfg.transformer_subfolder:
            transformer += "/" + cfg.transformer_subfolder.strip("/")
        return f"{source}+transformer={transformer}" + (f"@{cfg.transformer_revision}" if cfg.transformer_revision else "")

    @classmethod
    def preflight(cls, cfg, *, local):
        return checkpoint_checks(cfg, local=local, extra_sources=(("model.transformer_path", cfg.transformer_path),))

    def size_for(self, image: np.ndarray) -> tuple[int, int]:
        """The working (height, width) of an input image (`model.sizing`); a `SizeError` for impossible aspects."""
        return size_for(self.spec.rule, image.shape[0], image.shape[1], self.resolution, self.cfg.sizing)

    def batch_key(self, image: np.ndarray) -> tuple[int, int] | None:
        try:
            return self.size_for(image)
        except SizeError:
            return None  # predict answers it with its error, whatever it is batched with

    def predict(self, images, prompts, task, seeds):
        answers: list[np.ndarray | RowError | None] = [None] * len(images)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            try:
                buckets[self.size_for(image)].append(i)
            except SizeError as exc:
                answers[i] = RowError("image_unsupported_size", f"{self.spec.rule.pipeline}: {exc}")
        for (height, width), index in buckets.items():
            paintings = self._paint(
                [images[i] for i in index], [prompts[i] for i in index], [seeds[i] for i in index], height, width
            )
            for i, painting in zip(index, paintings):
                answers[i] = painting
        return answers

    def _paint(self, images, prompts, seeds, height, width) -> np.ndarray:
        """One pipeline call: images of one working size -> uint8 paintings (n, height, width, 3)."""
        n = len(images)
        kwargs = {
            "image": [Image.fromarray(im).resize((width, height), Image.BICUBIC) for im in images],
            "prompt": list(prompts),
            "height": height,
            "width": width,
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
            "output_type": "np",
            "num_inference_steps": self.settings["num_inference_steps"],
            self.spec.guidance_arg: self.settings[self.spec.guidance_arg],
        }
        if self.spec.call_kwargs is not None:
            kwargs.update(self.spec.call_kwargs(height, width))
        if "negative_prompt" in self.settings and "negative_prompt" not in self.cfg.options:
            kwargs["negative_prompt"] = [self.settings["negative_prompt"]] * n
        kwargs.update(self.cfg.options)
        out = self.pipe(**kwargs).images
        return np.rint(np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
