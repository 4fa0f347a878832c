"""Marigold (diffusers `MarigoldDepthPipeline` / `MarigoldNormalsPipeline`) with native outputs.

Marigold predicts affine-invariant depth in [0, 1] and unit normals in the
OpenGL frame directly, so its answers skip the colour codecs. One checkpoint
serves one task; `model.path` is either one checkpoint (its pipeline class
decides the task) or a mapping `{depth: ..., normals: ...}`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import numpy as np

from vb_batch.config import ConfigError
from vb_batch.models.base import ModelBackend

log = logging.getLogger(__name__)

TASK_OF_PIPELINE = {"MarigoldDepthPipeline": "depth", "MarigoldNormalsPipeline": "normals"}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pipeline(path: str, cfg):
    """Load a diffusers pipeline the way a user's checkpoint loads: safetensors only, no remote code."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if not log.isEnabledFor(logging.INFO):
        # Loading bars per component drown the job's own progress and summary.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

    local = os.path.isdir(path)
    if not local and (os.path.isabs(path) or path.startswith(".")):
        raise ConfigError(f"model.path: checkpoint directory {path!r} does not exist")
    try:
        pipe = DiffusionPipeline.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=getattr(torch, cfg.dtype),
            use_safetensors=True,
            local_files_only=local or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
        )
    except OSError as exc:
        raise ConfigError(
            f"model.path: cannot load {path!r} ({exc}); give a local directory with safetensors weights, "
            "or unset HF_HUB_OFFLINE to fetch a hub id"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(cfg.device))


class MarigoldBackend(ModelBackend):
    name = "marigold"
    default_profile = "marigold"

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.path:
            raise ConfigError("model.path: the marigold backend needs a checkpoint (directory or hub id)")
        paths = cfg.path if isinstance(cfg.path, dict) else {None: cfg.path}
        self.pipelines = {}
        for task, path in paths.items():
            pipe = load_pipeline(path, cfg)
            served = TASK_OF_PIPELINE.get(type(pipe).__name__)
            if served is None:
                raise ConfigError(f"model.path: {path!r} holds a {type(pipe).__name__}, not a Marigold pipeline")
            if task is not None and task != served:
                raise ConfigError(f"model.path.{task}: {path!r} is a {served} checkpoint")
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
            stack = np.stack([images[i] for i in index]).astype(np.float32) / 255.0
            generators = [torch.Generator(device=self.device).manual_seed(int(seeds[i])) for i in index]
            out = pipe(
                stack,
                num_inference_steps=self.cfg.num_inference_steps,
                processing_resolution=self.cfg.processing_resolution,
                generator=generators,
                batch_size=len(index),
                output_type="np",
            )
            pred = np.asarray(out.prediction, dtype=np.float32)
            for j, i in enumerate(index):
                answers[i] = pred[j, ..., 0] if task == "depth" else pred[j]
        return answers
