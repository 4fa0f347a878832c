"""A job in a child process that dies by SIGKILL at a chosen point: the crash half of tests/test_crash_recovery.py
and tests/test_writer_lease.py.

    python tests/crashing_job.py JOB.yaml                    run the job to its end
    python tests/crashing_job.py JOB.yaml POINT PHASE N      SIGKILL itself at the N-th call (1-based) of
                                                             POINT, just before (PHASE=before) or just after
                                                             (PHASE=after) the real call

POINT is a key of `KILL_POINTS`: the steps of writing and committing (a staged write, a
commit record, the move of a file into place, a lake table's commit, the lease). The
child kills itself with `os.kill(os.getpid(), SIGKILL)`, exactly what `kill -9` does
from outside: no `finally`, no `atexit`, no flush. A child that reaches its end prints
`calls POINT=<n>` for every point, so a test can see how far a run went.

Also here, importable by a child's job as `model.backend: crashing_job:GatedBackend`
(with `tests/` on PYTHONPATH): a model that waits for a file before its first
answer, so a test holds a run in the middle of its work for as long as it needs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter

from vb_batch.models.identity import IdentityBackend
from vb_batch.models.options import FreeFormOptions


class GatedBackend(IdentityBackend):
    """identity, but the first batch waits until the file `model.options.gate` exists (60 s at most)."""

    name = "gated"
    options_model = FreeFormOptions  # `model.options.gate`

    def predict(self, images, prompts, task, seeds):
        gate = self.cfg.options["gate"]
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        return super().predict(images, prompts, task, seeds)


def kill_points() -> dict[str, list[tuple[object, str]]]:
    """Where a child may die: point name -> the (owner, attribute) pairs to wrap (a function imported
    into two modules is wrapped in both)."""
    from fsspec.implementations.local import LocalFileSystem

    from vb_batch.io.lease import Lease
    from vb_batch.io.sinks import base, lake, parquet
    from vb_batch.io.sinks.delta import DeltaSink
    from vb_batch.io.sinks.iceberg import IcebergSink

    return {
        # commit records, intents, markers, run records, _SUCCESS
        "write_atomic": [(base, "write_atomic"), (parquet, "write_atomic"), (lake, "write_atomic")],
        "ParquetSink._apply": [(parquet.ParquetSink, "_apply")],  # the moves of a Parquet commit, as a whole
        "fs.mv": [(LocalFileSystem, "mv")],  # one file moved into place: between two moves of one commit
        "Sink.write": [(base.Sink, "write")],
        "Sink.stage": [(base.Sink, "stage")],  # a staged file counted; may commit
        "TableSink._commit_files": [(lake.TableSink, "_commit_files")],
        "DeltaSink._commit_added": [(DeltaSink, "_commit_added")],  # files moved, the Delta log not yet written
        "IcebergSink._commit_added": [(IcebergSink, "_commit_added")],  # files moved, no snapshot yet
        "Lease.acquire": [(Lease, "acquire")],
    }


CALLS: Counter[str] = Counter()


def arm(point: str, phase: str, nth: int) -> None:
    """Count calls of every point; die by SIGKILL at the `nth` call of `point`, `phase` the real call."""
    for name, targets in kill_points().items():
        for owner, attribute in targets:
            setattr(owner, attribute, _counted(name, getattr(owner, attribute), point, phase, nth))


def _counted(name, real, point, phase, nth):
    def call(*args, **kwargs):
        CALLS[name] += 1
        deadly = name == point and CALLS[name] == nth
        if deadly and phase == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if deadly and phase == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return call


def main(argv: list[str]) -> int:
    import vb_batch

    job = argv[0]
    if len(argv) == 4:
        arm(argv[1], argv[2], int(argv[3]))
    else:
        arm("", "", 0)  # count only
    summary = vb_batch.annotate(job)
    print(" ".join(f"calls {name}={n}" for name, n in sorted(CALLS.items())))
    return 0 if summary.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
