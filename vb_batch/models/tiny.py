"""Tiny random pipelines built from configs (as diffusers' own tests do), for tests, demos and benchmarks.

Every builder makes a real diffusers pipeline of toy size with random
weights and `save_pretrained`s it, so that it loads through the same
`from_pretrained` route as a user's checkpoint and runs the real call path:

    build_tiny_marigold        MarigoldDepthPipeline / MarigoldNormalsPipeline (~7 MB)
    build_tiny_flux2_klein     Flux2KleinPipeline   (Open Vision Banana's base)
    build_tiny_qwen_image_edit QwenImageEditPipeline
    build_tiny_flux_kontext    FluxKontextPipeline

Nothing is downloaded: the tokenizers are built here too (byte-level BPE
without merges, i.e. one token per byte, and a character-level T5 unigram),
with the special tokens and chat template their pipelines rely on. The edit
pipelines keep their real resize multiple (16 pixels) and their text
encoders keep the layer count the pipelines index by default, so they run
with the same call arguments as the full-size models.
"""

from __future__ import annotations

import string
from pathlib import Path

# Qwen's chat markers and vision placeholders (Qwen2-VL / Qwen3 share them).
QWEN_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen3's template with thinking switched off, as Flux2KleinPipeline renders it.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


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


# ---------------------------------------------------------------------------- tokenizers


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def tiny_qwen_tokenizer(chat_template: str | None = None):
    """A byte-level Qwen2 tokenizer without merges (one token per byte) plus Qwen's special tokens."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(_byte_alphabet())}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer without merges: one token per character, with CLIP's end-of-word variants."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    """A character-level T5 (unigram) tokenizer over printable ASCII."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -1.0) for c in chars] + [(c, -1.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# ---------------------------------------------------------------------------- edit pipelines


def _save(pipe, path: str | Path) -> Path:
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux2_klein(path: str | Path, seed: int = 0, transformer_only: bool = False) -> Path:
    """A random tiny `Flux2KleinPipeline` (Qwen3 text encoder, FLUX.2 VAE and transformer), saved to `path`.

    With `transformer_only`, save just a transformer (to `path/transformer`) of
    the same architecture and other weights: a stand-in for a fine-tuned
    transformer such as Open Vision Banana's, loaded over a base pipeline.
    """
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    text_hidden, text_layers = 16, 27  # the pipeline stacks hidden states 9, 18 and 27 by default
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_hidden, timestep_guidance_channels=32,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )
    if transformer_only:
        return _save(transformer, Path(path) / "transformer").parent
    tokenizer = tiny_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=text_hidden, intermediate_size=16, num_hidden_layers=text_layers, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKLFlux2(  # four blocks: 8x downsampling, as the real VAE
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        latent_channels=4, norm_num_groups=2, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=False,
    )
    return _save(pipe, path)


def build_tiny_qwen_image_edit(path: str | Path, seed: int = 0) -> Path:
    """A random tiny `QwenImageEditPipeline` (Qwen2.5-VL text+vision encoder, Qwen-Image VAE and transformer).

    Saved in the layout of the real checkpoint (`model_index.json` names transformers' `Qwen2VLProcessor`,
    `processor/` holds its tokenizer and image processor), but built without torchvision: transformers 5
    constructs `Qwen2VLProcessor` only with a video processor, which needs it. The image processor is
    the PIL one (`Qwen2VLImageProcessorPil`); the backend loads this layout the same way without torchvision.
    """
    import json

    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vb_batch.models.diffusers_edit import ImageOnlyQwen2VLProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    hidden, z_dim = 16, 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=hidden, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(  # three downsamplings: 8x, as the real VAE
        base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 2048,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0, "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.pad_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden,
            },
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
    )
    # The pipeline conditions at about 1 megapixel; the processor shrinks that to a few vision tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=4 * 28 * 28)
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        processor=ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer),
        transformer=transformer,
    )
    path = Path(path)
    pipe.register_modules(processor=None)  # saved below, as the real checkpoint stores it
    _save(pipe, path)
    image_processor.save_pretrained(path / "processor")
    tokenizer.save_pretrained(path / "processor")
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def build_tiny_flux_kontext(path: str | Path, seed: int = 0) -> Path:
    """A random tiny `FluxKontextPipeline` (CLIP + T5 text encoders, FLUX.1 VAE and transformer)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32, layer_norm_eps=1e-5,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    vae = AutoencoderKL(  # four blocks: 8x downsampling, as the real VAE
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        latent_channels=4, norm_num_groups=2, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, transformer=transformer,
        image_encoder=None, feature_extractor=None,
    )
    return _save(pipe, path)


TINY_BUILDERS = {
    "Flux2KleinPipeline": build_tiny_flux2_klein,
    "QwenImageEditPipeline": build_tiny_qwen_image_edit,
    "FluxKontextPipeline": build_tiny_flux_kontext,
}


def build_tiny_edit_pipeline(pipeline: str, path: str | Path, seed: int = 0) -> Path:
    """Build the tiny instruction-edit pipeline of class name `pipeline` at `path`."""
    try:
        builder = TINY_BUILDERS[pipeline]
    except KeyError:
        raise ValueError(f"no tiny builder for {pipeline!r}; known: {sorted(TINY_BUILDERS)}") from None
    return builder(path, seed=seed)
