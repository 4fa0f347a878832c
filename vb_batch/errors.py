"""Errors: per-row faults that are recorded in `vb_error` (the job goes on), and job-level faults."""

from __future__ import annotations

import os

import pyarrow as pa

# The per-row error column of every output: null when the row succeeded.
ERROR_COLUMN = "vb_error"
ERROR_TYPE = pa.struct([pa.field("code", pa.string()), pa.field("message", pa.string())])


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class RowError(Exception):
    """A fault of one row: kept in the output as `vb_error = {code, message}`, the job goes on.

    Codes are short and stable so that summaries and queries can group by them
    (`null_image`, `empty`, `not_image`, `truncated`, `too_large`, ...).
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def as_cell(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(ValueError):
    """A job config that cannot run; the message names the offending field (exit code 2)."""


class OutputExistsError(RuntimeError):
    """`output.mode: error` and the output already holds data."""


class QuotaExhaustedError(RuntimeError):
    """A hosted model's service says the quota is gone (for the day, or the account's credit): no retry helps.

    Not a row's fault: it stops the run cleanly. The rows already answered are committed, and
    the CLI exits with its own code (4, `EXIT_QUOTA`) and says how to resume once the quota
    is back (`output.mode: resume`: recorded batch jobs are re-attached, nothing is paid twice).
    """
