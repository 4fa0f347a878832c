"""Marigold (diffusers `MarigoldDepthPipeline` / `MarigoldNormalsPipeline`) with native outputs.

Marigold predicts affine-invariant depth in [0, 1] and unit normals in the
OpenGL frame directly, so its answers skip the colour codecs. One checkpoint
serves one task; `model.path` is either one checkpoint (its pipeline class
decides the task) or a mapping `{depth: ..., normals: ...}`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import numpy as np

from vb_batch.config import ConfigError
from vb_batch.models.base import ModelBackend
from vb_batch.models.options import MarigoldOptions
from vb_batch.models.preflight import checkpoint_checks
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


class SharedEncoder:
    """One VAE encode per image batch for Marigold pipelines that share their VAE (depth and normals).

    Marigold fine-tunes the UNet only, so its depth and normals checkpoints carry the
    same VAE; `share_vae` checks that weight for weight. The backend opens each
    pipeline call with a key made from the input pixels and everything that shapes
    the encoder's input (`call`); the n-th encode of a call whose key and input
    shape match the n-th encode of the calls before it reuses that result. Only the
    latest key's results are kept (one batch of latents); encodes outside a
    `call` are never cached.
    """

    def __init__(self, encode):
        self._encode = encode
        self._key = None  # the key of the pipeline call in progress, if any
        self._results_key = None  # the key `_results` belong to
        self._results: dict = {}
        self._calls = 0
        self.encodes = 0  # encoder runs, for tests and profiling

    @contextmanager
    def call(self, key):
        if key != self._results_key:
            self._results, self._results_key = {}, key
        self._key, self._calls = key, 0
        try:
            yield
        finally:
            self._key = None

    def __call__(self, sample, *args, **kwargs):
        if self._key is None:
            self.encodes += 1
            return self._encode(sample, *args, **kwargs)
        slot = (self._calls, tuple(sample.shape), sample.dtype, args, tuple(sorted(kwargs.items())))
        self._calls += 1
        if slot not in self._results:
            self.encodes += 1
            self._results[slot] = self._encode(sample, *args, **kwargs)
        return self._results[slot]


def share_vae(pipelines: list) -> SharedEncoder | None:
    """Give every pipeline the first one's VAE when all VAEs are equal, with one shared encode per batch."""
    import torch

    if len(pipelines) < 2:
        return None
    def architecture(module) -> dict:
        return {k: v for k, v in module.config.items() if not k.startswith("_")}  # not where it was loaded from

    vae = pipelines[0].vae
    reference = vae.state_dict()
    for pipe in pipelines[1:]:
        other = pipe.vae.state_dict()
        same = architecture(pipe.vae) == architecture(vae) and reference.keys() == other.keys()
        if not same or not all(torch.equal(reference[name], other[name]) for name in reference):
            return None
    for pipe in pipelines[1:]:
        pipe.register_modules(vae=vae)
    encoder = SharedEncoder(vae.encode)
    vae.encode = encoder
    return encoder


def batch_key(stack: np.ndarray, pipe, cfg) -> tuple:
    """Everything that decides what Marigold feeds its VAE encoder for a (N, H, W, 3) stack of images."""
    digest = hashlib.blake2b(stack.data, digest_size=16).hexdigest()
    resolution = cfg.processing_resolution or pipe.default_processing_resolution
    processor = tuple(sorted(pipe.image_processor.config.items()))
    return digest, stack.shape, resolution, processor, repr(sorted(cfg.options.items()))


class MarigoldBackend(ModelBackend):
    name = "marigold"
    default_profile = "marigold"
    options_model = MarigoldOptions

    def __init__(self, cfg):
        super().__init__(cfg)  # checks the options' problems (model.path)
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
        self.shared_encoder = share_vae(list(self.pipelines.values()))

    @classmethod
    def native_tasks_of(cls, cfg):
        return set(TASK_OF_PIPELINE.values())

    @classmethod
    def working_resolution(cls, cfg):
        return cfg.processing_resolution or None  # None: the checkpoint's default, known once loaded

    @classmethod
    def preflight(cls, cfg, *, local):
        return checkpoint_checks(cfg, local=local)

    def supported_tasks(self):
        return set(self.pipelines)

    def batch_key(self, image: np.ndarray) -> tuple[int, ...]:
        return image.shape  # one input size per pipeline call

    def predict(self, images, prompts, task, seeds):
        pipe = self.pipelines[task]
        answers: list[np.ndarray | None] = [None] * len(images)
        # Marigold takes one size per call: bucket the batch by shape.
        buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            buckets[image.shape].append(i)
        members = int(self.cfg.options.get("ensemble_size", 1))
        for index in buckets.values():
            if members > 1:
                # Ensembling fits one affine per member (depth) or averages directions (normals) over all of
                # an image's members; that fit amplifies the ~1e-7 float differences a different batch makes
                # (up to 0.18 on 0-1 depth). So an image's members always run together, alone, in a fixed order:
                # the same computation whatever the batch, hence the same label.
                calls = [[i] for i in index]
            else:
                calls = [index]
            for call in calls:
                predictions = self._run(pipe, [images[i] for i in call], [seeds[i] for i in call], members)
                for i, prediction in zip(call, predictions):
                    answers[i] = prediction[..., 0] if task == "depth" else prediction
        return answers

    def _run(self, pipe, images, seeds, members: int) -> np.ndarray:
        """One pipeline call on images of one shape, `members` ensemble members each: (N, H, W, C) predictions."""
        import torch

        # uint8 (N, 3, H, W) on the device, in the UNet's memory layout: the pipeline scales it to [0, 1] there.
        layout = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        stack = np.stack(images)
        pixels = to_device(stack, self.device).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        # One generator per ensemble member (Marigold repeats each image ensemble_size times, image-major).
        generators = [
            torch.Generator(device=self.device).manual_seed((int(seed) + k) % 2**63)
            for seed in seeds
            for k in range(members)
        ]
        shared = (
            nullcontext() if self.shared_encoder is None
            else self.shared_encoder.call(batch_key(stack, pipe, self.cfg))
        )
        with shared:
            out = pipe(
                pixels,
                num_inference_steps=self.cfg.num_inference_steps,
                processing_resolution=self.cfg.processing_resolution,
                generator=generators,
                batch_size=len(images) * members,
                output_type="np",
                **self.cfg.options,
            )
        return np.asarray(out.prediction, dtype=np.float32)
