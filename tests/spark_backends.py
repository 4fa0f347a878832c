"""Backends importable by path (`model.backend: spark_backends:CountingBackend`) from worker processes."""

from __future__ import annotations

import os

from vb_batch.models.identity import IdentityBackend


class CountingBackend(IdentityBackend):
    """identity, logging each load and each batch with the worker's pid to files named in model.options."""

    name = "counting"

    def __init__(self, cfg):
        super().__init__(cfg)
        with open(cfg.options["load_log"], "a") as f:
            f.write(f"{os.getpid()}\n")

    def predict(self, images, prompts, task, seeds):
        with open(self.cfg.options["batch_log"], "a") as f:
            f.write(f"{os.getpid()} {len(images)}\n")
        return super().predict(images, prompts, task, seeds)
