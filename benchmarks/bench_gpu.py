"""Images per second of vb_batch against the bare batched model loop, with FLOPs and MFU, side by side in one run.

Two models, each built here from its real configs with random weights
(`torch.manual_seed`), cast to the run's dtype and `save_pretrained`ed
(safetensors) to a temporary directory, so that vb_batch loads it through its
normal `from_pretrained` route:

    marigold      MarigoldDepthPipeline: SD2-shaped UNet (in_channels 8), the SD VAE, SD2's
                  OpenCLIP-H text encoder, DDIM (as vb_batch.models.tiny), 1 denoising step
                  (Marigold-LCM / e2e-ft style); backend `marigold`
    flux2-klein   Flux2KleinPipeline: FLUX.2 [klein] 4B transformer, FLUX.2 VAE, Qwen3-4B text
                  encoder, 4 steps (klein is step-distilled), guidance 1; backend `diffusers`
                  (Flux2KleinBatchPipeline), profile open-vision-banana

Per model, in the same process and on the same images (square, `--resolution`
pixels, so neither side resizes them):

    bare       the loop a GPU engineer would write: the pipeline object the vb_batch backend
               loaded, images already decoded in memory (Marigold: one device tensor; klein:
               PIL images, which its pipeline requires), one pipeline call per `--batch-size`
               images with the same steps / resolution as vb_batch, `output_type="np"`, one
               synchronize at the end; one warm-up batch not timed
    vb_batch   `vb_batch.job.run_job(cfg, backend)` (local engine) on the same images as PNG bytes in
               Parquet (read, decode, model, codecs, encode, commit), with the backend created once
               by `create_backend(cfg.model)` and a one-batch warm-up job before: model loading
               excluded, as for bare. ratio = vb_batch images/s / bare images/s (GPU target >= 0.9)
    vb_batch+load  `vb_batch.annotate(cfg)` end to end, cold (loads the model itself)
    CPU side   the vb_batch job with a model that costs nothing (`ZeroCostModel`): the images/s its
               decoding, encoding and writing sustain on this machine; a model faster than that waits

FLOPs per image (2 per multiply-add) come from `torch.utils.flop_counter.FlopCounterMode`:

    measured      over one single-image bare pipeline call at the run's configuration, after
                  the warm-up (Marigold encodes its empty prompt once per pipeline and caches it,
                  so it is not a per-image cost); split by the top-level module that ran it
    full size     the full-size modules built on the `meta` device (no weights allocated) and
                  run per component with the shapes the pipeline uses at 768 x 768, summed:
                  Marigold latents 96 x 96 (VAE encode, steps x UNet, VAE decode; the text
                  encoder once per pipeline, listed apart); klein 512 text tokens, VAE latents
                  32 x 96 x 96 packed to 48 x 48 = 2304 tokens plus 2304 reference tokens
                  (VAE encode, steps x transformer, VAE decode; the text encoder once per
                  distinct prompt, listed apart: vb_batch caches prompt embeddings)

The same meta count at the run's configuration is reported as a cross-check of
the measured count. FlopCounterMode counts matmuls, convolutions and attention
(attention in full, also where causal or masked); norms and elementwise ops are
not counted. Torch's counter misses CPU attention (`_scaled_dot_product_flash_attention_for_cpu`);
it is added here with torch's own SDPA formula.
Achieved TFLOP/s = FLOPs per image x images/s; MFU = achieved / peak, the peak
measured in the same run with a large square matmul in the run's dtype
(8192 on CUDA, 2048 on CPU; best of several).

Configs and where they come from (numbers not confirmed are marked so):

    SD2 UNet      stabilityai/stable-diffusion-2(-1) unet/config.json (mirrored on GitHub, e.g.
                  jack-op11/stable-diffusion-2-1-base, sample_size 64 there; 96 for the 768 model);
                  in_channels 8 as Marigold. upcast_attention false: unconfirmed, FLOP-neutral
    SD VAE        same repository, vae/config.json
    OpenCLIP-H    same repository, text_encoder/config.json (23 layers, hidden 1024, 16 heads,
    text          intermediate 4096, gelu, vocab 49408)
    klein 4B      diffusers scripts/convert_flux2_to_diffusers.py, `klein-4b` (5 double + 20 single
    transformer   blocks, 24 heads x 128, joint_attention_dim 7680, in_channels 128, no guidance
                  embeddings); the same numbers in several independent ports
    FLUX.2 VAE    AutoencoderKLFlux2's defaults, which the conversion script converts the real VAE
                  with; 84,046,115 parameters, as a published count of the real VAE
    Qwen3-4B      hidden 2560, 36 layers, 32 heads, 8 KV heads, head_dim 128, intermediate 9728,
                  vocab 151936, tied embeddings (several ports and a C port's "from
                  text_encoder/config.json"). rope_theta 1e6 and max_position_embeddings 40960:
                  unconfirmed for klein's copy, FLOP-neutral
    klein         is_distilled true (klein 4B, not klein-base); scheduler shift 3.0, dynamic
                  shifting 0.5..1.15 over 256..4096 tokens: from a FLUX.2 port, unconfirmed for
                  klein, FLOP-neutral. Open Vision Banana sits on klein *base* (50 steps, CFG by
                  default): run it with --klein-steps and expect ~2x FLOPs per step with CFG

The reduced size keeps every architecture (block types, 8x VAE, klein's 27+
text layers and packing) with fewer channels and layers, in float32 at 128 px,
so that both models finish in a few minutes on a 2-core CPU.

    python benchmarks/bench_gpu.py                       # cuda: full size, bf16, 768 px -> results/gpu.json
    python benchmarks/bench_gpu.py                       # cpu: reduced, fp32, 128 px -> results/gpu-cpu-reduced.json
    python benchmarks/bench_gpu.py --flops-only          # full-size params and FLOPs per image only (meta device)
    python benchmarks/bench_gpu.py --models marigold --images 64 --batch-size 16 --no-write

With $OUT set, the result JSON is also written there. Where a
command may run at most ~10 minutes, run the models one by one, e.g.
`--models flux2-klein --output benchmarks/results/gpu-klein.json`: at full size klein's
random 8 B parameters are built, saved (~16 GB) and loaded twice (cold and warm).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import REPO, write_images  # noqa: E402

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import vb_batch
from vb_batch.config import load_config
from vb_batch.engines.local import io_thread_count
from vb_batch.job import run_job
from vb_batch.models.base import create_backend
from vb_batch.models.identity import IdentityBackend
from vb_batch.models.loading import quiet_loading
from vb_batch.models.profiles import get_profile
from vb_batch.models.tiny import (
    QWEN3_CHAT_TEMPLATE,
    tiny_clip_tokenizer,
    tiny_qwen_tokenizer,
)

FULL_RESOLUTION = 768
MODELS = ("marigold", "flux2-klein")
KLEIN_TEXT_TOKENS = 512  # Flux2KleinPipeline pads every prompt to max_sequence_length=512
KLEIN_GUIDANCE = 1.0  # the distilled recipe; also silences the pipeline's "guidance ignored" warning

# ---------------------------------------------------------------------------- configs (see the docstring)

SD2_UNET = {
    "sample_size": 96, "in_channels": 8, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": (5, 10, 20, 20),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 1024, "use_linear_projection": True, "norm_num_groups": 32, "norm_eps": 1e-5,
}
SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 768,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD2_TEXT = {
    "hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16, "intermediate_size": 4096,
    "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 512,
    "layer_norm_eps": 1e-5,
}
MARIGOLD_SCHEDULER = {  # as vb_batch.models.tiny (Marigold's DDIM, v-prediction, trailing spacing)
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "timestep_spacing": "trailing",
}
KLEIN_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}
FLUX2_VAE = {  # = AutoencoderKLFlux2() defaults, spelled out
    "in_channels": 3, "out_channels": 3, "latent_channels": 32, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "patch_size": (2, 2),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
QWEN3_4B = {
    "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936, "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
}
KLEIN_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}

# Reduced: the same block structure with fewer channels and layers. Klein's text encoder keeps
# 27 layers because the pipeline stacks hidden states 9, 18 and 27; its latents keep 32 channels
# (128 packed) and the VAE keeps four blocks (8x), so token counts scale like the real model's.
REDUCED = {
    "marigold": {
        "unet": {"block_out_channels": (32, 64, 128, 128), "attention_head_dim": (1, 2, 4, 4), "layers_per_block": 1,
                 "cross_attention_dim": 64, "norm_num_groups": 8},
        "vae": {"block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8},
        "text_encoder": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    },
    "flux2-klein": {
        "transformer": {"num_layers": 1, "num_single_layers": 2, "num_attention_heads": 4, "attention_head_dim": 32,
                        "axes_dims_rope": (8, 8, 8, 8), "joint_attention_dim": 3 * 64},
        "vae": {"block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8},
        "text_encoder": {"hidden_size": 64, "num_hidden_layers": 27, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "head_dim": 16, "intermediate_size": 192, "max_position_embeddings": 1024},
    },
}


def make_tokenizer(model: str):
    """File-less tokenizers (vb_batch.models.tiny): one token per byte, with the special tokens the pipelines use."""
    return tiny_clip_tokenizer() if model == "marigold" else tiny_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)


def component_configs(model: str, size: str, tokenizer) -> dict[str, dict[str, Any]]:
    """{component: constructor kwargs} of `model` at `size` ("full" or "reduced")."""
    if model == "marigold":
        specs = {"unet": dict(SD2_UNET), "vae": dict(SD_VAE), "text_encoder": dict(SD2_TEXT)}
        specs["text_encoder"].update(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    else:
        specs = {"transformer": dict(KLEIN_TRANSFORMER), "vae": dict(FLUX2_VAE), "text_encoder": dict(QWEN3_4B)}
        specs["text_encoder"]["pad_token_id"] = tokenizer.pad_token_id
    if size == "reduced":
        for name, overrides in REDUCED[model].items():
            specs[name].update(overrides)
        if model == "flux2-klein":
            specs["text_encoder"]["vocab_size"] = len(tokenizer)  # the full vocabulary's embedding is most of its size
    return specs


def build_modules(model: str, specs: dict[str, dict[str, Any]]) -> dict[str, torch.nn.Module]:
    """The model's torch modules from `specs`, on the current default device (`meta` allocates nothing)."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLFlux2,
        Flux2Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    if model == "marigold":
        return {
            "unet": UNet2DConditionModel(**specs["unet"]),
            "vae": AutoencoderKL(**specs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**specs["text_encoder"])),
        }
    return {
        "transformer": Flux2Transformer2DModel(**specs["transformer"]),
        "vae": AutoencoderKLFlux2(**specs["vae"]),
        "text_encoder": Qwen3ForCausalLM(Qwen3Config(**specs["text_encoder"])),
    }


def save_random_model(model: str, specs, tokenizer, resolution: int, dtype: torch.dtype, device: str, path: Path) -> Path:
    """Build the pipeline with random weights in `dtype` and `save_pretrained` it (safetensors) to `path`."""
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        MarigoldDepthPipeline,
    )
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(0)
    # Random init of billions of parameters is much faster on the GPU; the files are the same.
    with torch.device(device if device.startswith("cuda") else "cpu"):
        modules = build_modules(model, specs)
    # Casting a diffusers model warns about modules "to keep in float32" (none here): keep the log clean.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    for module in modules.values():
        module.to(device="cpu", dtype=dtype)
    diffusers_logging.set_verbosity(verbosity)
    if model == "marigold":
        pipe = MarigoldDepthPipeline(
            unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizer,
            scheduler=DDIMScheduler(**MARIGOLD_SCHEDULER), prediction_type="depth", scale_invariant=True,
            shift_invariant=True, default_denoising_steps=1, default_processing_resolution=resolution,
        )
    else:
        pipe = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER), vae=modules["vae"],
            text_encoder=modules["text_encoder"], tokenizer=tokenizer, transformer=modules["transformer"],
            is_distilled=True,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------- FLOPs


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Torch's counter knows the CUDA attention kernels but not the CPU one; without this, attention is
# silently left out of every CPU count.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
EXTRA_FLOP_FORMULAS = {_CPU_SDPA: _sdpa_flops} if _CPU_SDPA is not None else {}

# FlopCounterMode names each top-level module by its class; these are the pipeline's components.
COMPONENT_OF_MODULE = {
    "Encoder": "vae_encoder", "Decoder": "vae_decoder", "Conv2d": "vae_quant_convs",
    "UNet2DConditionModel": "unet", "Flux2Transformer2DModel": "transformer",
    "CLIPTextModel": "text_encoder", "Qwen3ForCausalLM": "text_encoder",
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per pipeline component) of running `fn`."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with torch.no_grad(), counter:
        fn()
    total = counter.get_total_flops()
    by_component: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and "." not in name:
            key = COMPONENT_OF_MODULE.get(name, name)
            by_component[key] = by_component.get(key, 0) + sum(ops.values())
    rest = total - sum(by_component.values())
    if rest:
        by_component["other"] = rest
    return total, by_component


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters once


def meta_flops(model: str, specs, resolution: int, steps: int) -> dict[str, Any]:
    """Params and FLOPs per image of `model` at `specs`, run per component on the meta device.

    The shapes are those the pipeline uses for one square image of `resolution` pixels.
    """
    with torch.device("meta"):
        modules = build_modules(model, specs)
    params = {name: count_params(m) for name, m in modules.items()}
    meta = {"device": "meta"}
    latent = resolution // 8  # both VAEs downsample 8x
    vae = modules["vae"]
    per_image = {
        "vae_encoder": count_flops(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, **meta)))[0],
        "vae_decoder": count_flops(
            lambda: vae.decode(torch.zeros(1, specs["vae"]["latent_channels"], latent, latent, **meta))
        )[0],
    }
    once: dict[str, int] = {}
    text = modules["text_encoder"]
    if model == "marigold":
        unet = modules["unet"]
        # The empty prompt is [bos, eos]; Marigold encodes it once per pipeline and caches it.
        once["text_encoder"] = count_flops(lambda: text(torch.zeros(1, 2, dtype=torch.long, **meta)))[0]
        context = torch.zeros(1, 2, specs["unet"]["cross_attention_dim"], **meta)
        sample = torch.zeros(1, specs["unet"]["in_channels"], latent, latent, **meta)
        step = count_flops(lambda: unet(sample, torch.zeros((), **meta), encoder_hidden_states=context))[0]
        per_image["unet"] = steps * step
    else:
        transformer = modules["transformer"]
        tokens = 2 * (resolution // 16) ** 2  # packed 2x2 latents: the noise plus the reference image
        ids = torch.zeros(1, KLEIN_TEXT_TOKENS, dtype=torch.long, **meta)
        # A prepared 4D mask: transformers' own mask building reads values, which meta tensors lack.
        mask = torch.ones(1, 1, KLEIN_TEXT_TOKENS, KLEIN_TEXT_TOKENS, dtype=torch.bool, **meta)
        # vb_batch's klein pipeline caches each prompt's embedding, and a job repeats its prompts.
        once["text_encoder"] = count_flops(
            lambda: text(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        )[0]
        step = count_flops(lambda: transformer(
            hidden_states=torch.zeros(1, tokens, specs["transformer"]["in_channels"], **meta),
            timestep=torch.zeros(1, **meta), guidance=None,
            encoder_hidden_states=torch.zeros(1, KLEIN_TEXT_TOKENS, specs["transformer"]["joint_attention_dim"], **meta),
            txt_ids=torch.zeros(1, KLEIN_TEXT_TOKENS, 4, dtype=torch.long, **meta),
            img_ids=torch.zeros(1, tokens, 4, dtype=torch.long, **meta), return_dict=False,
        ))[0]
        per_image["transformer"] = steps * step
    return {
        "params": {**params, "total": sum(params.values())},
        "flops_per_image": sum(per_image.values()),
        "flops_per_image_by_component": per_image,
        "flops_once_per_pipeline": once,
        "denoiser_flops_per_step": step,
    }


# ---------------------------------------------------------------------------- inputs and runs


def make_images(n: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """`n` smooth random colour fields with a little noise, uint8 (side, side, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    images = []
    for _ in range(n):
        coef = rng.uniform(-1, 1, (3, 3)).astype(np.float32)
        field = coef[:, 0, None, None] * xx + coef[:, 1, None, None] * yy + coef[:, 2, None, None] * np.sin(6 * xx * yy)
        rgb = 128 + 90 * field.transpose(1, 2, 0) + rng.normal(0, 8, (side, side, 3))
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return images


def job_config(model: str, input_path: Path, output_path: Path, model_path: Path, args, steps: int) -> dict[str, Any]:
    cfg_model: dict[str, Any] = {
        "backend": "marigold" if model == "marigold" else "diffusers",
        "path": str(model_path),
        "dtype": args.dtype,
        "device": args.device,
        "batch_size": args.batch_size,
        "processing_resolution": args.resolution,
        "num_inference_steps": steps,
    }
    if model == "flux2-klein":
        cfg_model.update(profile="open-vision-banana", guidance_scale=KLEIN_GUIDANCE)
    return {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": "overwrite", "report": False},
        "run": {"progress": False},
        "engine": {"kind": "local"},
        "tasks": ["depth"],
        "model": cfg_model,
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_call(model: str, pipe, args, steps: int, device: str) -> Callable[[Any], Any]:
    """One pipeline call on a batch, with the arguments vb_batch's backend uses."""
    if model == "marigold":
        def call(batch):  # batch: (B, 3, H, W) in [0, 1] on the device
            return pipe(batch, num_inference_steps=steps, processing_resolution=args.resolution,
                        batch_size=len(batch), generator=torch.Generator(device).manual_seed(0), output_type="np")
        return call
    prompt = get_profile("open-vision-banana").templates["depth"]

    def call(batch):  # batch: PIL images at the working size
        return pipe(image=batch, prompt=[prompt] * len(batch), height=args.resolution, width=args.resolution,
                    num_inference_steps=steps, guidance_scale=KLEIN_GUIDANCE,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    return call


def bare_inputs(model: str, images: list[np.ndarray], batch_size: int, device: str) -> list[Any]:
    """The images already decoded, as the batches the bare loop feeds the pipeline."""
    if model == "marigold":
        # Contiguous NCHW, as the vb_batch backend hands it over (a permuted view is another memory layout).
        stack = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return [stack[i:i + batch_size] for i in range(0, len(images), batch_size)]
    pil = [Image.fromarray(image) for image in images]
    return [pil[i:i + batch_size] for i in range(0, len(pil), batch_size)]


def time_bare(call, batches, images: int, device: str) -> dict[str, float]:
    call(batches[0])  # warm-up (allocator, kernels, cached prompt embedding): not timed
    synchronize(device)
    started = time.perf_counter()
    for batch in batches:
        call(batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_second": images / seconds}


def time_vb(cfg, backend, device: str) -> dict[str, Any]:
    synchronize(device)
    started = time.perf_counter()
    summary = run_job(cfg, backend)
    synchronize(device)
    seconds = time.perf_counter() - started
    if not summary.success:
        raise RuntimeError(summary.render())
    # Where the model thread's time went: a fed model is busy nearly all of the run.
    return {"seconds": seconds, "images_per_second": summary.rows_processed / seconds,
            "rows_ok": summary.rows_ok, "rows_failed": summary.rows_failed,
            "model_seconds": summary.model_seconds, "model_busy_fraction": summary.model_seconds / seconds,
            "model_input_wait_seconds": summary.model_input_wait_seconds,
            "model_output_wait_seconds": summary.model_output_wait_seconds}


CAPACITY_IMAGES = 32


class ZeroCostModel(IdentityBackend):
    """A model that costs nothing but answers like the benchmarked one: vb_batch's CPU side alone.

    Marigold answers depth natively (float maps of each image's size, here a noisy
    ramp, so that PNG encoding costs what a real map costs); klein paints, so its
    stand-in hands each image back as its painting (the `identity` backend) and
    the codec decodes it. The images per second of a job with it are the most
    the CPU side sustains on this machine: a model faster than that would wait.
    """

    name = "zero-cost"

    def __init__(self, cfg, native_depth: bool):
        super().__init__(cfg)
        self.native_depth = native_depth
        self.maps: dict[tuple[int, int], np.ndarray] = {}

    def supported_tasks(self):
        return {"depth"}

    def predict(self, images, prompts, task, seeds):
        if not self.native_depth:
            return list(images)
        return [self.depth_map(image.shape[:2]) for image in images]

    def depth_map(self, shape: tuple[int, int]) -> np.ndarray:
        if shape not in self.maps:
            rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
            noise = np.random.default_rng(0).normal(0, 0.01, shape)
            self.maps[shape] = (0.5 + 30 * cols + 10 * rows**2 + noise).astype(np.float32)
        return self.maps[shape]


def peak_matmul_tflops(device: str, dtype: torch.dtype, repeats: int = 10) -> dict[str, Any]:
    """Best-of-`repeats` TFLOP/s of a large square matmul: the ceiling for this device and dtype."""
    n, inner = (8192, 20) if device.startswith("cuda") else (2048, 2)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - started) / inner)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / best / 1e12}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_model(model: str, args, root: Path, peak: float) -> dict[str, Any]:
    """Build, load and run one model; every figure of its row in the results."""
    steps = args.marigold_steps if model == "marigold" else args.klein_steps
    dtype = getattr(torch, args.dtype)
    tokenizer = make_tokenizer(model)
    specs = component_configs(model, args.size, tokenizer)
    full = meta_flops(model, component_configs(model, "full", tokenizer), FULL_RESOLUTION, steps)
    estimate = meta_flops(model, specs, args.resolution, steps)
    print(f"  {model}: full size {full['params']['total'] / 1e9:.3f} B params, "
          f"{full['flops_per_image'] / 1e12:.2f} TFLOP per image at {FULL_RESOLUTION} px", flush=True)

    started = time.perf_counter()
    model_path = save_random_model(model, specs, tokenizer, args.resolution, dtype, args.device, root / f"model-{model}")
    build_s = time.perf_counter() - started
    images = make_images(args.images, args.resolution)
    input_path = write_images(root / f"in-{model}", images)
    warm_path = write_images(root / f"in-{model}-warm", images[: args.batch_size])
    cfg_of = lambda src, dst: job_config(model, src, root / dst, model_path, args, steps)

    cold = None
    if not args.skip_cold:
        started = time.perf_counter()
        summary = vb_batch.annotate(cfg_of(input_path, f"out-{model}-cold"))
        synchronize(args.device)
        seconds = time.perf_counter() - started
        if not summary.success:
            raise RuntimeError(summary.render())
        cold = {"seconds": seconds, "images_per_second": summary.rows_processed / seconds}
        free_memory()

    cfg = load_config(cfg_of(input_path, f"out-{model}-vb"))
    started = time.perf_counter()
    backend = create_backend(cfg.model)
    load_s = time.perf_counter() - started
    pipe = backend.pipelines["depth"] if model == "marigold" else backend.pipe
    call = bare_call(model, pipe, args, steps, args.device)
    batches = bare_inputs(model, images, args.batch_size, args.device)

    run_job(load_config(cfg_of(warm_path, f"out-{model}-warm")), backend)  # vb_batch's warm-up: one batch
    bare_runs, vb_runs = [], []
    for _ in range(args.repeats):  # alternate, so that drift on a shared machine hits both sides
        bare_runs.append(time_bare(call, batches, len(images), args.device))
        vb_runs.append(time_vb(cfg, backend, args.device))
    bare = max(bare_runs, key=lambda r: r["images_per_second"])
    vb = max(vb_runs, key=lambda r: r["images_per_second"])
    # At least 32 images (the model is free): a handful would measure the job's fixed costs, not its rate.
    capacity_images = max(CAPACITY_IMAGES, len(images))
    capacity_path = write_images(root / f"in-{model}-capacity", make_images(capacity_images, args.resolution))
    capacity_cfg = load_config(cfg_of(capacity_path, f"out-{model}-capacity"))
    zero_cost = ZeroCostModel(cfg.model, native_depth=model == "marigold")
    time_vb(capacity_cfg, zero_cost, "cpu")  # warm-up (the codec's colour table)
    capacity = max(
        (time_vb(capacity_cfg, zero_cost, "cpu") for _ in range(max(3, args.repeats))),
        key=lambda r: r["images_per_second"],
    )

    # One single-image bare call after the warm-ups: the steady-state work per image.
    flops, by_component = count_flops(partial(call, batches[0][:1]))
    params = {name: count_params(module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}

    row: dict[str, Any] = {
        "model": model,
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
        "resolution": args.resolution,
        "num_inference_steps": steps,
        "batch_size": args.batch_size,
        "images": len(images),
        "configs": specs,
        "params": {**params, "total": sum(params.values())},
        "flops_per_image": flops,
        "flops_per_image_by_component": by_component,
        "flops_per_image_meta_estimate": estimate["flops_per_image"],
        "flops_once_per_pipeline_meta_estimate": estimate["flops_once_per_pipeline"],
        "full_size_params": full["params"],
        f"full_size_flops_per_image_{FULL_RESOLUTION}": full["flops_per_image"],
        f"full_size_flops_per_image_{FULL_RESOLUTION}_by_component": full["flops_per_image_by_component"],
        f"full_size_flops_once_per_pipeline_{FULL_RESOLUTION}": full["flops_once_per_pipeline"],
        f"full_size_denoiser_flops_per_step_{FULL_RESOLUTION}": full["denoiser_flops_per_step"],
        "build_and_save_seconds": round(build_s, 2),
        "vb_batch_load_seconds": round(load_s, 2),
        "peak_tflops": peak,
    }
    for label, run in (("bare", bare), ("vb_batch", vb)):
        achieved = flops * run["images_per_second"] / 1e12
        row[label] = {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()},
            "tflops": round(achieved, 4),
            "mfu": round(achieved / peak, 4),
        }
    row["bare"]["seconds_all_runs"] = [round(r["seconds"], 3) for r in bare_runs]
    row["vb_batch"]["seconds_all_runs"] = [round(r["seconds"], 3) for r in vb_runs]
    row["ratio"] = round(vb["images_per_second"] / bare["images_per_second"], 4)
    row["vb_batch_with_load"] = None if cold is None else {k: round(v, 4) for k, v in cold.items()}
    # The same job with a model that costs nothing: what vb_batch's CPU side sustains here (io threads, 1 writer).
    row["vb_batch_zero_cost_model"] = {
        "images": capacity_images,
        "images_per_second": round(capacity["images_per_second"], 3),
        "io_threads": io_thread_count(cfg.engine.io_threads),
        "cpus": os.cpu_count(),
    }
    del backend, pipe, call, batches
    free_memory()
    shutil.rmtree(model_path, ignore_errors=True)  # full-size checkpoints are tens of GB
    return row


# ---------------------------------------------------------------------------- reporting


def machine_info(device: str) -> dict[str, Any]:
    import diffusers
    import transformers

    info: dict[str, Any] = {
        **common.machine_info(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "vb_batch": vb_batch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else common.cpu_model(),
    }
    try:  # which code was measured; read-only
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def print_flops(model: str, full: dict[str, Any]) -> None:
    print(f"{model}: full size at {FULL_RESOLUTION} px")
    for name, n in full["params"].items():
        print(f"  params {name:14s} {n / 1e6:12.1f} M")
    for name, f in full["flops_per_image_by_component"].items():
        print(f"  FLOPs  {name:14s} {f / 1e12:12.3f} T per image")
    for name, f in full["flops_once_per_pipeline"].items():
        print(f"  FLOPs  {name:14s} {f / 1e12:12.6f} T once per pipeline (cached; not per image)")
    print(f"  FLOPs  {'total':14s} {full['flops_per_image'] / 1e12:12.3f} T per image")


def print_table(rows: list[dict[str, Any]], peak: float) -> None:
    print()
    print(f"{'model':12s} {'size':8s} {'px':>4s} {'dtype':9s} {'bare img/s':>11s} {'vb img/s':>9s} {'ratio':>6s} "
          f"{'vb+load':>8s} {'GFLOP/img':>10s} {'full TFLOP/img':>15s} {'bare TF/s':>10s} {'vb TF/s':>8s} "
          f"{'MFU bare':>9s} {'MFU vb':>7s} {'vb model busy':>14s} {'CPU side img/s':>15s}")
    for r in rows:
        cold = r["vb_batch_with_load"]
        cold_text = f"{cold['images_per_second']:8.2f}" if cold else f"{'-':>8s}"
        print(f"{r['model']:12s} {r['size']:8s} {r['resolution']:4d} {r['dtype']:9s} "
              f"{r['bare']['images_per_second']:11.3f} {r['vb_batch']['images_per_second']:9.3f} {r['ratio']:6.3f} "
              f"{cold_text} {r['flops_per_image'] / 1e9:10.2f} "
              f"{r[f'full_size_flops_per_image_{FULL_RESOLUTION}'] / 1e12:15.2f} "
              f"{r['bare']['tflops']:10.4f} {r['vb_batch']['tflops']:8.4f} "
              f"{r['bare']['mfu']:9.2%} {r['vb_batch']['mfu']:7.2%} {r['vb_batch']['model_busy_fraction']:14.1%} "
              f"{r['vb_batch_zero_cost_model']['images_per_second']:15.2f}")
    print(f"(peak: {peak:.3f} TFLOP/s, measured matmul; vb+load: vb_batch img/s including model loading; "
          f"full TFLOP/img: full-size model at {FULL_RESOLUTION} px; CPU side img/s: the same job with a model "
          f"that costs nothing, the most vb_batch's decoding, encoding and writing sustain here)")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", choices=("full", "reduced"), default=None,
                        help="default: full on CUDA, reduced on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="square side in px (full: 768, reduced: 128)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on CUDA at full size, else float32")
    parser.add_argument("--images", type=int, default=None, help="images per model (full: 64, reduced: 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="full: 8, reduced: 4")
    parser.add_argument("--marigold-steps", type=int, default=1)
    parser.add_argument("--klein-steps", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per side, alternating; the best counts (full: 2, reduced: 3)")
    parser.add_argument("--skip-cold", action="store_true", help="skip the vb_batch run that includes loading")
    parser.add_argument("--flops-only", action="store_true",
                        help="print full-size params and FLOPs per image (meta device) and exit")
    parser.add_argument("--output", type=Path, default=None,
                        help="result JSON (default: benchmarks/results/gpu.json, or gpu-cpu-<size>.json on CPU)")
    parser.add_argument("--no-write", action="store_true", help="write no result JSON")
    args = parser.parse_args(argv)

    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("full" if cuda else "reduced")
    full = args.size == "full"
    args.resolution = args.resolution or (FULL_RESOLUTION if full else 128)
    args.dtype = args.dtype or ("bfloat16" if cuda and full else "float32")
    args.images = args.images or (64 if full else 32)
    args.batch_size = args.batch_size or (8 if full else 4)
    args.repeats = args.repeats or (2 if full else 3)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {list(MODELS)}")
    if args.resolution % 16:
        parser.error("--resolution must be a multiple of 16 (klein's latent patch)")

    if args.flops_only:
        for model in models:
            steps = args.marigold_steps if model == "marigold" else args.klein_steps
            specs = component_configs(model, "full", make_tokenizer(model))
            print_flops(model, meta_flops(model, specs, FULL_RESOLUTION, steps))
        return None

    quiet_loading()  # no progress bars per component loaded or saved
    print(f"bench_gpu: {args.size} size on {args.device}, {args.dtype}, {args.resolution} px, "
          f"{args.images} images in batches of {args.batch_size}", flush=True)
    peak = peak_matmul_tflops(args.device, getattr(torch, args.dtype))
    print(f"  peak matmul {peak['n']}^2 {peak['dtype']}: {peak['tflops']:.3f} TFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vb-bench-gpu-") as tmp:
        for model in models:
            started = time.perf_counter()
            row = bench_model(model, args, Path(tmp), peak["tflops"])
            row["benchmark_seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(f"  {model}: bare {row['bare']['images_per_second']:.3f} img/s, vb_batch "
                  f"{row['vb_batch']['images_per_second']:.3f} img/s (ratio {row['ratio']:.3f}), "
                  f"{row['flops_per_image'] / 1e9:.2f} GFLOP/img, {row['benchmark_seconds']:.0f} s", flush=True)

    # The peak again, after the models: on a shared machine one measurement can catch a busy moment.
    again = peak_matmul_tflops(args.device, getattr(torch, args.dtype))
    peak["tflops_all_runs"] = [round(peak["tflops"], 4), round(again["tflops"], 4)]
    if again["tflops"] > peak["tflops"]:
        peak["tflops"] = again["tflops"]
        for row in rows:
            row["peak_tflops"] = peak["tflops"]
            for side in ("bare", "vb_batch"):
                row[side]["mfu"] = round(row[side]["tflops"] / peak["tflops"], 4)

    report = {
        "benchmark": "benchmarks/bench_gpu.py",
        "machine": machine_info(args.device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("no_write", "flops_only")},
        "peak": peak,
        "results": rows,
    }
    print_table(rows, peak["tflops"])
    if not args.no_write:  # on the GPU machine, $OUT gets a copy: results come back from there
        name = "gpu" if cuda else f"gpu-cpu-{args.size}"
        print(f"wrote {common.write_result(name, report, args.output)}")
    return report


if __name__ == "__main__":
    main()
