"""Model backends: one protocol (images + prompts in, one painting or native map per image out)."""

from vb_batch.models.base import BACKENDS, ModelBackend, create_backend, model_id, register_backend
from vb_batch.models.profiles import PROFILES, ModelProfile, get_profile

__all__ = ["BACKENDS", "ModelBackend", "create_backend", "model_id", "register_backend", "PROFILES", "ModelProfile", "get_profile"]
