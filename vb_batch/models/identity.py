"""The `identity` backend: answers every prompt with the input image itself.

It makes the whole pipeline testable without a model: feed images that are
codec encodings of known maps and the outputs must equal those maps.
"""

from __future__ import annotations

from vb_batch.models.base import ModelBackend


class IdentityBackend(ModelBackend):
    name = "identity"

    def predict(self, images, prompts, task, seeds):
        return list(images)
