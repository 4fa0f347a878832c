"""Tiny random Marigold pipelines built from configs (as diffusers' own tests do), for tests and the demo.

They compute the real Marigold call path at toy size (about 7 MB, ~0.1 s per
image on a CPU) and load through the same `from_pretrained` route as a user's
checkpoint. No weights are downloaded: everything is built locally.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_marigold(path: str | Path, task: str = "depth", seed: int = 0) -> Path:
    """Build a random tiny Marigold depth or normals pipeline and `save_pretrained` it to `path`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        MarigoldDepthPipeline,
        MarigoldNormalsPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if task not in ("depth", "normals"):
        raise ValueError(f"tiny Marigold serves depth or normals, not {task!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="trailing",
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, layer_norm_eps=1e-5,
        )
    )
    # Marigold prompts with the empty string, which a file-less CLIP tokenizer handles.
    tokenizer = CLIPTokenizer(model_max_length=77)
    pipeline_cls = MarigoldDepthPipeline if task == "depth" else MarigoldNormalsPipeline
    kwargs = {"scale_invariant": True, "shift_invariant": True} if task == "depth" else {}
    pipe = pipeline_cls(
        unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
        prediction_type=task, default_denoising_steps=1, default_processing_resolution=64, **kwargs,
    )
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
