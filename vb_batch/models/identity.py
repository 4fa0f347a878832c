"""The `identity` backend: answers every prompt with the input image itself.

It makes the whole pipeline testable without a model: feed images that are
codec encodings of known maps and the outputs must equal those maps.
"""

from __future__ import annotations

from vb_batch.models.base import ModelBackend
from vb_batch.models.options import FreeFormOptions


class IdentityBackend(ModelBackend):
    name = "identity"
    # It reads no key of its own; `model.options` stays open for the backends built on it (test doubles).
    options_model = FreeFormOptions

    def predict(self, images, prompts, task, seeds):
        return list(images)
