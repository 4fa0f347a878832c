"""A model whose cost is time, not cores: for measuring how many model calls an engine keeps in flight.

`model.backend: sleep_model:SleepModel` (with `benchmarks/` on the workers' PYTHONPATH), `model.options.seconds`
per batch; answers are the identity painting. With `model.options.log` (a file path) each call appends
`<start> <end> <images>` (monotonic seconds, this host's clock) to it, from whichever process runs the model.
"""

from __future__ import annotations

import time

from vb_batch.models.identity import IdentityBackend


class SleepModel(IdentityBackend):
    name = "sleep"

    def predict(self, images, prompts, task, seeds):
        start = time.monotonic()
        time.sleep(float(self.cfg.options.get("seconds", 0)))
        answers = super().predict(images, prompts, task, seeds)
        if self.cfg.options.get("log"):
            with open(self.cfg.options["log"], "a") as log:
                log.write(f"{start} {time.monotonic()} {len(images)}\n")
        return answers
