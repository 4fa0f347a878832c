"""Stage 2 (the model, GPU): decoded images -> the model's answer per row, task and ensemble pass.

    run_model:     one batch -> `_vb_answer_<task>_<pass>` per row (paintings, or values)
    ModelBatcher:  the same over a stream of batches: rows of one working size (the backend's
                   `batch_key`) share calls of `model.batch_size` across batches, output in order

A backend whose calls wait on a remote service (a Batch API's jobs) says how many
may run at once (`calls_in_flight`): the batcher then submits up to that many calls
on threads and keeps taking batches while they run; a batch is handed on when its
last call ends, still in input order. A stage that stops early (`close`) tells the
calls still running to end (`backend.cancel_calls`).

A model fault never fails a batch: a call that fails is retried in smaller
pieces (halves on out-of-memory, single rows otherwise) and a row that still
fails, or whose answer is not an image, gets its `vb_error`. Seeds are per row,
so no label depends on which rows share a call. With `model.decode_on_device`
the paintings are decoded here, batched by shape, on the model's device
(`decode_on_device`). A backend that cannot do a configured task fails the job
(`check_backend`), not each row.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vb_batch.config import ConfigError, JobConfig
from vb_batch.errors import ERROR_COLUMN, ERROR_TYPE, QuotaExhaustedError, RowError
from vb_batch.io.encodings import arrays_to_column
from vb_batch.models.base import ModelBackend, groups_by_size
from vb_batch.models.loading import to_device
from vb_batch.pipeline.columns import (
    IMAGE_COLUMN,
    USAGE_COLUMN,
    USAGE_TYPE,
    answer_column,
    array_cells,
    column_values,
    confidence_column,
    row_errors,
    set_column,
)
from vb_batch.pipeline.resolved import ResolvedJob, row_seed
from vb_batch.pipeline.rows import output_error, row_error
from vb_batch.tasks import Task, TaskContext
from vb_batch.timing import count, current, phase, run_collecting

__all__ = [
    "ModelBatcher",
    "check_backend",
    "decode_on_device",
    "group_window",
    "is_out_of_memory",
    "model_answer",
    "model_rows_at_once",
    "run_model",
]

log = logging.getLogger(__name__)


def check_backend(plan: ResolvedJob, backend: ModelBackend) -> None:
    """Fail the job (not each row) when the loaded model cannot do a configured task."""
    missing = [t.name for t in plan.tasks if t.name not in backend.supported_tasks()]
    if missing:
        raise ConfigError(
            f"tasks: model.backend {plan.cfg.model.backend!r} ({plan.model}) cannot do {missing}; "
            f"it does {sorted(backend.supported_tasks())}"
        )


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU (or accelerator) out-of-memory error: the batch was too big, not the rows bad."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _predict_rows(backend: ModelBackend, images, prompts, task: str, seeds) -> list[np.ndarray | RowError]:
    """Predict a batch, so that one bad row or one too-big batch cannot fail the others.

    Out of memory: the batch is split in halves and each half retried (down to
    single rows). Any other fault: rows are retried singly; a row that still
    fails gets a `model_error`. Seeds are per row, so splitting changes no label.
    """
    try:
        answers = backend.predict(images, prompts, task, seeds)
        if len(answers) != len(images):
            raise RuntimeError(f"backend returned {len(answers)} answers for {len(images)} images")
        return answers
    except QuotaExhaustedError:
        raise  # not a row's fault: the run stops (and commits what it has)
    except Exception as batch_exc:  # noqa: BLE001 - any model fault is retried in smaller pieces
        if len(images) == 1:
            code = "model_out_of_memory" if is_out_of_memory(batch_exc) else "model_error"
            return [RowError(code, f"{type(batch_exc).__name__}: {batch_exc}")]
        if is_out_of_memory(batch_exc):
            _free_accelerator_memory()
            half = len(images) // 2
            log.warning("model batch of %d ran out of memory; splitting it in two", len(images))
            pieces = [slice(0, half), slice(half, len(images))]
        else:
            log.warning("model batch of %d failed (%s); retrying rows singly", len(images), batch_exc)
            pieces = [slice(i, i + 1) for i in range(len(images))]
        out: list[np.ndarray | RowError] = []
        for piece in pieces:
            out += _predict_rows(backend, images[piece], prompts[piece], task, seeds[piece])
        return out


def decode_on_device(
    task: Task, ctx: TaskContext, pass_index: int, answers: list, errors: list, device: Any
) -> list[np.ndarray | None]:
    """Decode one pass's paintings on the model's device, batched by shape; `answers` become values.

    Paintings cross to the device as uint8 (from pinned memory on a GPU) and
    the decoded values come back once per batch. A batch that fails to decode
    is retried row by row, so one malformed painting only fails its own row.
    Returns the per-pixel confidence of each row.
    """
    confidences: list[np.ndarray | None] = [None] * len(answers)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, painting in enumerate(answers):
        if painting is not None:
            buckets[(painting.shape, painting.dtype.str)].append(i)
    pending = list(buckets.values())
    while pending:
        index = pending.pop()
        try:
            pixels = to_device(np.stack([answers[i] for i in index]), device)
            decoded = task.decode_pass(pixels, ctx, pass_index)
            values, confidence = decoded.values.cpu().numpy(), decoded.confidence.cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - a bad painting is its row's fault
            if len(index) > 1:
                pending += [[i] for i in index]
                continue
            errors[index[0]] = errors[index[0]] or output_error(task.name, exc)
            answers[index[0]] = None
            continue
        for j, i in enumerate(index):
            answers[i], confidences[i] = values[j], confidence[j]
    return confidences


def model_answer(result: Any) -> np.ndarray:
    """A backend's answer for one row as an array (H, W) or (H, W, C) of numbers; its RowError raised."""
    if isinstance(result, RowError):
        raise result
    answer = np.asarray(result)
    if answer.dtype.kind not in "uif" or answer.ndim not in (2, 3) or 0 in answer.shape[:2]:
        raise RowError("model_bad_answer", f"the model answered a {answer.dtype} array of shape {answer.shape}, "
                       "not an image or a map")
    return answer


def run_model(batch: pa.RecordBatch, plan: ResolvedJob, backend: ModelBackend) -> pa.RecordBatch:
    """Stage 2 (GPU) on one batch: one answer per valid row, task and ensemble pass.

    Rows are grouped by the backend's `batch_key` into calls of at most `model.batch_size`
    (`ModelBatcher`); paintings are decoded here when `decode_on_device`.
    """
    batcher = ModelBatcher(plan, backend, window=0)
    try:
        (answered,) = batcher.add(batch) + batcher.flush()
    finally:
        batcher.close()  # a call that failed stops the others still running
    return answered


@dataclass(eq=False)
class _Waiting:
    """A batch in the model stage: its rows' inputs, and the answers gathered so far."""

    batch: pa.RecordBatch
    images: list[np.ndarray | None]
    errors: list[dict[str, str] | None]
    seeds: list[int | None]
    phrases: list[str] | None
    answers: dict[tuple[int, int], list[np.ndarray | None]]  # (task index, pass) -> per row
    rows: int  # valid rows
    left: int  # valid rows not answered yet
    usage: list[dict[str, Any] | None]  # tokens and cost the service billed per row (hosted models)


class ModelBatcher:
    """Stage 2 over a stream of batches: rows grouped by the backend's `batch_key` into full model calls.

    Batches go in with `add` and come out answered, in the order they went in. In
    between, a valid row waits in a pool of rows of its key (its working size) until
    `model.batch_size` rows make one call. When more than `window` rows wait, or more
    than `window + batch_size` valid rows are held (answered ones behind a waiting
    one count too), the pool holding the oldest row runs as it is; `flush` runs them
    all. So a stream of mixed-size photos fills its calls without reordering the
    output, and memory holds a bounded number of decoded rows. A backend without
    keys (None) gets calls of `batch_size` rows across batch boundaries; a row whose
    key cannot be had runs in a call of its own. Seeds are per row: no label
    depends on which rows share a call.
    """

    def __init__(self, plan: ResolvedJob, backend: ModelBackend, window: int | None = None):
        self.plan, self.backend = plan, backend
        self.size = plan.cfg.model.batch_size
        self.window = group_window(plan.cfg) if window is None else window
        self.batches: deque[_Waiting] = deque()
        self.pools: dict[Any, list[tuple[int, _Waiting, int]]] = {}  # key -> (arrival, batch, row)
        self.waiting = 0  # valid rows in the pools
        self.held = 0  # valid rows of the batches not handed back yet
        self.arrivals = itertools.count()
        self.passes = [(t, p) for t, task in enumerate(plan.tasks) for p in range(task.passes(plan.ctx))]
        self.in_flight = max(1, backend.calls_in_flight)
        self.running: dict[Future, list[tuple[int, _Waiting, int]]] = {}  # calls on threads -> their rows
        self._threads: ThreadPoolExecutor | None = None
        self._times = None

    def add(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Take one decoded batch; return the batches now answered (the oldest first)."""
        images, errors = array_cells(batch, IMAGE_COLUMN), row_errors(batch)
        rows = [i for i, image in enumerate(images) if image is not None and errors[i] is None]
        ids = column_values(batch, self.plan.cfg.input.id_column)
        seeds: list[int | None] = [None] * batch.num_rows
        for i in rows:
            seeds[i] = row_seed(self.plan.cfg.model.seed, ids[i])
        phrases = None
        if self.plan.ctx.phrase_column:
            phrases = [p or self.plan.ctx.phrase or "" for p in column_values(batch, self.plan.ctx.phrase_column)]
        entry = _Waiting(batch, images, errors, seeds, phrases,
                         {key: [None] * batch.num_rows for key in self.passes}, len(rows), len(rows),
                         [None] * batch.num_rows)
        self.batches.append(entry)
        for i in rows:
            try:
                key = self.backend.batch_key(images[i])
            except Exception:  # noqa: BLE001 - a user backend's fault: the row runs alone, predict says why
                key = object()
            pool = self.pools.setdefault(key, [])
            pool.append((next(self.arrivals), entry, i))
            self.waiting += 1
            if len(pool) >= self.size:
                self._call(key)
        self.held += len(rows)
        done = self._answered()
        # Rows answered behind a waiting one are held too: bound them as well, or a size that never
        # fills a call would keep every later batch in memory.
        while self.pools and (self.waiting > self.window or self.held > self.window + self.size):
            self._call(self._oldest())
            done += self._answered()
        return done

    def flush(self) -> list[pa.RecordBatch]:
        """Run every waiting row; return the rest of the batches, answered."""
        while self.pools:
            self._call(self._oldest())
        while self.running:
            self._collect(block=True)
        return self._answered()

    def close(self) -> None:
        """Stop: calls not started are dropped, calls still running are told to end (`backend.cancel_calls`).

        Every way out of the stage calls it (the loop's, `run_model`'s): after a failure, a Batch API
        call in flight would otherwise go on polling its jobs on its thread. Their rows are dropped
        (a resume redoes them, re-attaching to recorded jobs). Harmless when nothing runs.
        """
        if self._threads is None:
            return
        self._threads.shutdown(wait=False, cancel_futures=True)
        if any(not future.done() for future in self.running):
            self.backend.cancel_calls()

    def _oldest(self) -> Any:
        return min(self.pools, key=lambda key: self.pools[key][0][0])

    def _call(self, key: Any) -> None:
        """One model call per task and pass on the pool of `key` (at most batch_size rows)."""
        pool = self.pools.pop(key)
        members, rest = pool[: self.size], pool[self.size :]
        if rest:
            self.pools[key] = rest
        self.waiting -= len(members)
        if self.in_flight == 1:
            self._apply(members, self._predict(members))
            return
        while len(self.running) >= self.in_flight:
            self._collect(block=True)
        if self._threads is None:
            self._times = current()
            self._threads = ThreadPoolExecutor(self.in_flight, thread_name_prefix="vb-model-call")
        self.running[self._threads.submit(run_collecting, self._times, self._predict, members)] = members

    def _predict(self, members) -> list[list[np.ndarray | RowError]]:
        """The model's results for `members`, one list per task and pass (on a call thread when in flight)."""
        images = [entry.images[i] for _, entry, i in members]
        seeds = [entry.seeds[i] for _, entry, i in members]
        phrases = None if self.plan.ctx.phrase_column is None else [entry.phrases[i] for _, entry, i in members]
        outcomes = []
        for t, p in self.passes:
            task = self.plan.tasks[t]
            prompts = task.prompts(self.plan.ctx, len(members), p, phrases)
            with phase("model"):
                outcomes.append(_predict_rows(self.backend, images, prompts, task.name, seeds))
            count("model_calls")
            count("model_images", len(images))
        return outcomes

    def _apply(self, members, outcomes) -> None:
        """Put one call's results in its rows (a bad answer is the row's error); the rows are answered."""
        for (t, p), results in zip(self.passes, outcomes):
            task = self.plan.tasks[t]
            for (_, entry, i), result in zip(members, results):
                try:
                    entry.answers[t, p][i] = model_answer(result)
                except Exception as exc:  # noqa: BLE001 - the row guard: a bad answer is this row's error
                    entry.errors[i] = entry.errors[i] or row_error(exc, "model_bad_answer", f"{task.name}: ")
        for _, entry, i in members:
            usage = entry.usage[i] = self.backend.take_usage(entry.seeds[i])
            if usage is not None:  # the run's total, in the summary (counted like model_calls)
                for name in ("input_tokens", "output_tokens", "thought_tokens", "cost"):
                    count(f"usage_{name}", usage.get(name) or 0)
            entry.left -= 1

    def _collect(self, block: bool) -> None:
        """Apply the calls that ended (waiting for one when `block`); a call's exception stops the stage."""
        if not self.running:
            return
        done, _ = wait(list(self.running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            self._apply(self.running.pop(future), future.result())

    def _answered(self) -> list[pa.RecordBatch]:
        self._collect(block=False)
        done = []
        while self.batches and self.batches[0].left == 0:
            entry = self.batches.popleft()
            self.held -= entry.rows
            done.append(self._finish(entry))
        return done

    def _finish(self, entry: _Waiting) -> pa.RecordBatch:
        """The batch with its answer columns (decoded on the model's device where the plan says so)."""
        batch = entry.batch
        for t, p in self.passes:
            task, answers = self.plan.tasks[t], entry.answers[t, p]
            if self.plan.decodes_on_device(task):
                confidences = decode_on_device(task, self.plan.ctx, p, answers, entry.errors, self.backend.device)
                batch = set_column(batch, confidence_column(task.name, p), arrays_to_column(confidences))
            batch = set_column(batch, answer_column(task.name, p), arrays_to_column(answers))
        if any(usage is not None for usage in entry.usage):
            batch = set_column(batch, USAGE_COLUMN, pa.array(entry.usage, USAGE_TYPE))
        return set_column(batch, ERROR_COLUMN, pa.array(entry.errors, ERROR_TYPE))


def group_window(cfg: JobConfig) -> int:
    """`model.group_window`: how many rows may wait for others of their working size (default 4 batches)."""
    window = cfg.model.group_window
    return 4 * cfg.model.batch_size if window is None else window


def model_rows_at_once(cfg: JobConfig) -> int:
    """Rows one model task takes at once where rows cannot wait across tasks (a Ray actor's call).

    `batch_size`, plus `group_window` for a backend with working sizes (`batch_key`), known from its
    class without loading it: the task groups them into calls of at most `batch_size`.
    """
    return cfg.model.batch_size + (group_window(cfg) if groups_by_size(cfg.model) else 0)
