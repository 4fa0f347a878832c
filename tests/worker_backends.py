"""Backends importable by path (`model.backend: worker_backends:CountingBackend`) from Spark and Ray workers."""

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


class DiesOnceBackend(IdentityBackend):
    """identity, but the first batch it ever sees kills its process (like an OOM-killed GPU worker).

    `model.options.marker` is a file that records the death, so the restarted worker carries on.
    """

    name = "dies-once"

    def predict(self, images, prompts, task, seeds):
        marker = self.cfg.options["marker"]
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return super().predict(images, prompts, task, seeds)


class SlowBackend(IdentityBackend):
    """identity that takes `model.options.seconds` per batch (a stand-in for a slow GPU model)."""

    name = "slow"

    def predict(self, images, prompts, task, seeds):
        import time

        time.sleep(float(self.cfg.options.get("seconds", 0)))
        return super().predict(images, prompts, task, seeds)


class TimedBackend(IdentityBackend):
    """identity that sleeps `model.options.seconds` per batch and logs `pid start end` of each call to
    `model.options.log`: a model whose cost is time, not cores, so a test can see calls overlap."""

    name = "timed"

    def predict(self, images, prompts, task, seeds):
        import time

        started = time.time()
        time.sleep(float(self.cfg.options.get("seconds", 0)))
        with open(self.cfg.options["log"], "a") as f:
            f.write(f"{os.getpid()} {started} {time.time()}\n")
        return super().predict(images, prompts, task, seeds)


class KeyedCountingBackend(IdentityBackend):
    """identity keyed by image size (as a model with per-size working sizes is), logging each call's sizes
    (`pid h1xw1 h2xw2 ...`) to `model.options.log`; each call sleeps `model.options.seconds`."""

    name = "keyed-counting"

    def batch_key(self, image):
        return image.shape[:2]

    def predict(self, images, prompts, task, seeds):
        import time

        time.sleep(float(self.cfg.options.get("seconds", 0)))  # a call's cost, for the model-seconds count
        with open(self.cfg.options["log"], "a") as f:
            f.write(" ".join([str(os.getpid())] + [f"{im.shape[0]}x{im.shape[1]}" for im in images]) + "\n")
        return super().predict(images, prompts, task, seeds)
