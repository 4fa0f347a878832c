"""Backends a `vb-batch` subprocess imports by path (`model.backend: job_backends:NoisyBackend`, tests/ on PYTHONPATH).

NoisyBackend   identity, writing around logging the way other libraries do: raw bytes on file
               descriptor 2 (as C++ does), a child process's output, a Python warning, a tqdm bar,
               a print to stdout and a handler of its own bound to the old stderr
SlowBackend    identity, sleeping `model.options.delay_s` seconds a call (a run that lasts)
QuotaBackend   identity until `model.options.rows` rows are answered, then the service's quota is gone
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings

from vb_batch.errors import QuotaExhaustedError
from vb_batch.models.identity import IdentityBackend


class NoisyBackend(IdentityBackend):
    name = "noisy"

    def __init__(self, cfg):
        super().__init__(cfg)
        own = logging.getLogger("noisy_library")
        own.propagate = False
        own.addHandler(logging.StreamHandler(sys.__stderr__))  # like diffusers' or Ray's own handler

    def predict(self, images, prompts, task, seeds):
        from tqdm import tqdm

        os.write(2, b"[2026-12-07 11:45:43,845 E 7640 7640] core_worker.cc:2465: a C++ line\n")
        os.write(2, b"WARNING: a line from the JVM itself\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child on stdout'); print('child on stderr', file=sys.stderr)"],
                       check=True)
        warnings.warn("a Python warning from a library", UserWarning, stacklevel=1)
        for _ in tqdm(range(3), desc="a library's bar"):
            pass
        print("a print to stdout", flush=True)
        logging.getLogger("noisy_library").error("a library's own handler")
        return super().predict(images, prompts, task, seeds)


class SlowBackend(IdentityBackend):
    name = "slow"

    def predict(self, images, prompts, task, seeds):
        time.sleep(float(self.cfg.options["delay_s"]))
        return super().predict(images, prompts, task, seeds)


class QuotaBackend(IdentityBackend):
    name = "quota"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.answered = 0

    def predict(self, images, prompts, task, seeds):
        if self.answered >= int(self.cfg.options.get("rows", 0)):
            raise QuotaExhaustedError("the day's image quota of the test project is used up")
        self.answered += len(images)
        return super().predict(images, prompts, task, seeds)
