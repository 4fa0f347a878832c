"""Marigold (diffusers `MarigoldDepthPipeline` / `MarigoldNormalsPipeline`) with native outputs.

Marigold predicts affine-invariant depth in [0, 1] and unit normals in the
OpenGL frame directly, so its answers skip the colour codecs. One checkpoint
serves one task; `model.path` is either one checkpoint (its pipeline class
decides the task) or a mapping `{depth: ..., normals: ...}`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from vb_batch.config import ConfigError
from vb_batch.models.base import ModelBackend
from vb_batch.models.loading import (
    compile_denoiser, from_pretrained, quiet_loading, resolve_device, to_device, use_channels_last,
)

# Call arguments the backend sets itself; `model.options` passes anything else (ensemble_size, ...).
RESERVED_OPTIONS = {"image", "generator", "batch_size", "output_type", "num_inference_steps", "processing_resolution"}
TASK_OF_PIPELINE = {"MarigoldDepthPipeline": "depth", "MarigoldNormalsPipeline": "normals"}


def load_pipeline(path: str, cfg):
    """Load a Marigold checkpoint the way a user's checkpoint loads (see `vb_batch.models.loading`)."""
    import torch
    from diffusers import DiffusionPipeline

    quiet_loading()
    pipe = from_pretrained(DiffusionPipeline, path, "model.path", revision=cfg.revision, dtype=getattr(torch, cfg.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(cfg.device))


class MarigoldBackend(ModelBackend):
    name = "marigold"
    default_profile = "marigold"

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.path:
            raise ConfigError("model.path: the marigold backend needs a checkpoint (directory or hub id)")
        reserved = sorted(RESERVED_OPTIONS & set(cfg.options))
        if reserved:
            raise ConfigError(f"model.options: {reserved} are set by the marigold backend itself")
        if cfg.dtype != "float32" and resolve_device(cfg.device) == "cpu":
            # Marigold resizes with antialiased interpolation; torch's CPU kernel for it has no half-precision
            # version (every row would fail with NotImplementedError).
            raise ConfigError(f"model.dtype: {cfg.dtype} Marigold needs a GPU (device cuda); use float32 on the CPU")
        paths = cfg.path if isinstance(cfg.path, dict) else {None: cfg.path}
        self.pipelines = {}
        for task, path in paths.items():
            pipe = load_pipeline(path, cfg)
            served = TASK_OF_PIPELINE.get(type(pipe).__name__)
            if served is None:
                raise ConfigError(f"model.path: {path!r} holds a {type(pipe).__name__}, not a Marigold pipeline")
            if task is not None and task != served:
                raise ConfigError(f"model.path.{task}: {path!r} is a {served} checkpoint")
            if cfg.channels_last:
                use_channels_last(pipe)
            if cfg.compile:
                compile_denoiser(pipe)
            self.pipelines[served] = pipe
        self.device = resolve_device(cfg.device)

    @classmethod
    def native_tasks_of(cls, cfg):
        return set(TASK_OF_PIPELINE.values())

    def supported_tasks(self):
        return set(self.pipelines)

    def predict(self, images, prompts, task, seeds):
        import torch

        pipe = self.pipelines[task]
        answers: list[np.ndarray | None] = [None] * len(images)
        # Marigold takes one size per call: bucket the batch by shape.
        buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            buckets[image.shape].append(i)
        for index in buckets.values():
            # uint8 (N, 3, H, W) on the device, in the UNet's memory layout: the pipeline scales it to [0, 1] there.
            layout = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
            pixels = to_device(np.stack([images[i] for i in index]), self.device).permute(0, 3, 1, 2)
            pixels = pixels.contiguous(memory_format=layout)
            # One generator per ensemble member (Marigold repeats each image ensemble_size times, image-major).
            members = int(self.cfg.options.get("ensemble_size", 1))
            generators = [
                torch.Generator(device=self.device).manual_seed((int(seeds[i]) + k) % 2**63)
                for i in index
                for k in range(members)
            ]
            out = pipe(
                pixels,
                num_inference_steps=self.cfg.num_inference_steps,
                processing_resolution=self.cfg.processing_resolution,
                generator=generators,
                batch_size=len(index),
                output_type="np",
                **self.cfg.options,
            )
            pred = np.asarray(out.prediction, dtype=np.float32)
            for j, i in enumerate(index):
                answers[i] = pred[j, ..., 0] if task == "depth" else pred[j]
        return answers
