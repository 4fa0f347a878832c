"""A model whose cost is time, not cores: for measuring how many model calls an engine keeps in flight.

`model.backend: sleep_model:SleepModel` (with `benchmarks/` on the workers' PYTHONPATH), `model.options.seconds`
per batch; answers are the identity painting.
"""

from __future__ import annotations

import time

from vb_batch.models.identity import IdentityBackend


class SleepModel(IdentityBackend):
    name = "sleep"

    def predict(self, images, prompts, task, seeds):
        time.sleep(float(self.cfg.options.get("seconds", 0)))
        return super().predict(images, prompts, task, seeds)
