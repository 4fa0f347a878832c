"""Model backends: one protocol (images + prompts in, one painting or native map per image out).

    base.py            ModelBackend (the protocol and its hooks: options, working resolution,
                       provenance, cost estimate, preflight), the BACKENDS registry, create_backend
    options.py         each built-in backend's own keys (pydantic, unknown keys refused; no heavy imports)
    preflight.py       what `vb-batch plan` checks of a checkpoint without loading it
    identity.py        the input image is the painting (codec debugging, tests)
    marigold.py        Marigold depth / normals pipelines (native outputs)
    diffusers_edit.py  instruction-edit pipelines (FLUX.2 [klein], FLUX.1 Kontext, Qwen-Image-Edit)
    sizing.py          each pipeline's working sizes and aspect buckets
    demo_generalist.py the shipped demo model          http.py  a remote painting endpoint
    hosted.py          what the hosted backends share   gemini.py, openai_images.py  their SDKs
    profiles.py        prompts and codec presets per model profile
    loading.py         device, dtype, safetensors-only loading    tiny.py  tiny random test pipelines
"""

from vb_batch.models.base import BACKENDS, ModelBackend, create_backend, model_id, register_backend
from vb_batch.models.profiles import PROFILES, ModelProfile, get_profile

__all__ = ["BACKENDS", "ModelBackend", "create_backend", "model_id", "register_backend", "PROFILES", "ModelProfile", "get_profile"]
