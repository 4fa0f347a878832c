"""The `diffusers` backend: instruction-edit pipelines that paint their answer (image + prompt -> image).

The pipeline class is read from `model_index.json` of `model.path` (a local
directory or a hub id); these run:

    Flux2KleinPipeline     FLUX.2 [klein]. Open Vision Banana is the klein base with its
                           fine-tuned transformer: `model.transformer_path` (+ `_subfolder`)
    QwenImageEditPipeline  Qwen-Image-Edit (transformers' Qwen2-VL processor needs torchvision)
    FluxKontextPipeline    FLUX.1 Kontext

How a batch runs:

1. Each image is resized (bicubic: it is a photo) to its working size: the
   aspect kept, the area about `processing_resolution`**2 (default 1024**2),
   each side a multiple of the pipeline's latent patch (16 px).
2. Images of one working size make one pipeline call (bucketing), with one
   `torch.Generator` per image seeded from its row: an image's label does not
   depend on what it was batched with, nor on the device (CPU generators).
3. The painting comes back at the working size, untouched. The decode stage
   decodes its colours first and then maps the values to the input size
   (nearest for class ids): resampling a painting would blend legend colours
   into the colours of other classes.

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

import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, FluxKontextPipeline, QwenImageEditPipeline
from PIL import Image

from vb_batch.config import ConfigError
from vb_batch.models.base import ModelBackend
from vb_batch.models.loading import (
    compile_denoiser, from_pretrained, load_error, local_only, quiet_loading, resolve_device, use_channels_last,
)

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


@dataclass(frozen=True)
class EditPipeline:
    """How to drive one pipeline class: what to load, how to name its guidance, extra call arguments."""

    load_as: type
    guidance_arg: str
    min_side: int = 0  # smallest working side the pipeline accepts
    call_kwargs: Callable[[int, int], dict[str, Any]] | None = None  # (height, width) -> extra arguments


EDIT_PIPELINES: dict[str, EditPipeline] = {
    # Klein refuses condition images under 64 px a side.
    "Flux2KleinPipeline": EditPipeline(Flux2KleinBatchPipeline, "guidance_scale", min_side=64),
    "QwenImageEditPipeline": EditPipeline(QwenImageEditPipeline, "true_cfg_scale"),
    # Kontext would snap to its preferred ~1 MP sizes; the working size is already chosen.
    "FluxKontextPipeline": EditPipeline(
        FluxKontextPipeline,
        "guidance_scale",
        call_kwargs=lambda height, width: {"max_area": height * width, "_auto_resize": False},
    ),
}
# Call arguments the backend sets itself; `model.options` may not override them.
RESERVED_OPTIONS = {
    "image", "prompt", "height", "width", "generator", "output_type", "return_dict", "num_images_per_prompt",
}


def working_size(height: int, width: int, resolution: int, multiple: int, min_side: int = 0) -> tuple[int, int]:
    """(h, w): the aspect of (height, width), area about resolution**2 (0: the input's), sides multiples of `multiple`."""
    scale = resolution / math.sqrt(height * width) if resolution else 1.0
    if min_side and min(height, width) * scale < min_side:
        scale = min_side / min(height, width)
        return tuple(math.ceil(side * scale / multiple) * multiple for side in (height, width))
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


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
    if class_name == "QwenImageEditPipeline":
        from transformers.utils import is_torchvision_available

        if not is_torchvision_available():
            raise ConfigError(
                "model.path: QwenImageEditPipeline needs torchvision (transformers' Qwen2-VL processor); "
                "install the torchvision build that matches your torch"
            )

    dtype = getattr(torch, cfg.dtype)
    components = {}
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
        self.multiple = self.pipe.vae_scale_factor * 2
        resolution = cfg.processing_resolution
        self.resolution = DEFAULT_RESOLUTION if resolution is None else resolution

    def size_for(self, image: np.ndarray) -> tuple[int, int]:
        """The working (height, width) of an input image."""
        return working_size(image.shape[0], image.shape[1], self.resolution, self.multiple, self.spec.min_side)

    def predict(self, images, prompts, task, seeds):
        answers: list[np.ndarray | None] = [None] * len(images)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            buckets[self.size_for(image)].append(i)
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
        }
        if self.spec.call_kwargs is not None:
            kwargs.update(self.spec.call_kwargs(height, width))
        if self.cfg.num_inference_steps is not None:
            kwargs["num_inference_steps"] = self.cfg.num_inference_steps
        if self.cfg.guidance_scale is not None:
            kwargs[self.spec.guidance_arg] = self.cfg.guidance_scale
            if self.spec.guidance_arg == "true_cfg_scale" and "negative_prompt" not in self.cfg.options:
                kwargs["negative_prompt"] = [" "] * n  # Qwen's true CFG runs only with a negative prompt
        kwargs.update(self.cfg.options)
        out = self.pipe(**kwargs).images
        return np.rint(np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
