"""The engine-free stages of a job, as functions on Arrow record batches.

    fetch_decode:   rows -> RGB uint8 per row (column `_vb_rgb`) and `vb_error` per row
    run_model:      RGB -> the model's answer per task and ensemble pass (`_vb_answer_*`);
                    `ModelBatcher` runs it over a stream, rows grouped into calls by working size
    decode_encode:  answers -> values through the codecs -> storage encoding,
                    confidence, summary scalars, provenance; internal columns dropped

Every engine (local threads, Ray tasks and actors, Spark executors) runs these
same functions; it only decides where. Between stages, arrays travel as the
`array` storage struct (shape, dtype, bytes), so a batch can cross process
boundaries unchanged. A fault of one row never fails its batch: the row keeps
its input columns, gets null outputs and a `vb_error {code, message}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import threading
import uuid
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from vb_batch._version import __version__
from vb_batch.codecs import Decoded
from vb_batch.codecs import normals as normals_codec
from vb_batch.config import ConfigError, JobConfig, OutputConfig, redacted
from vb_batch.errors import RowError
from vb_batch.io.encodings import arrays_to_column, column_to_arrays, encode_map, storage_type
from vb_batch.io.fetch import read_uri
from vb_batch.io.images import NeededSize, decode_for_model
from vb_batch.io.sources import image_bytes
from vb_batch.models.base import ModelBackend, backend_class, model_id
from vb_batch.models.loading import to_device
from vb_batch.models.profiles import get_profile
from vb_batch.registry import added_entries
from vb_batch.tasks import Task, TaskContext, build_legend, get_task
from vb_batch.timing import count, current, phase, run_collecting

log = logging.getLogger(__name__)

IMAGE_COLUMN = "_vb_rgb"
# The whole upright image's (height, width): the decoded pixels may be a reduced JPEG decode.
IMAGE_SIZE_COLUMN = "_vb_image_size"
IMAGE_SIZE_TYPE = pa.list_(pa.int32())
ERROR_COLUMN = "vb_error"
ERROR_TYPE = pa.struct([pa.field("code", pa.string()), pa.field("message", pa.string())])
PROVENANCE_COLUMNS = ("vb_model", "vb_profile", "vb_run_id", "vb_version")
# Under the output: where hosted backends record their remote jobs (`ModelBackend.needs_state_dir`).
HOSTED_STATE_DIR = "_vb/hosted"


def new_run_id() -> str:
    """Sortable by start time, unique across machines."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def answer_column(task: str, pass_index: int) -> str:
    return f"_vb_answer_{task}_{pass_index}"


def confidence_column(task: str, pass_index: int) -> str:
    """Per-pixel confidence of a pass decoded in the model worker (`model.decode_on_device`)."""
    return f"_vb_confidence_{task}_{pass_index}"


def row_seed(seed: int, row_id: Any) -> int:
    """Per-row sampling seed from the job seed and the row id: the same labels whatever the batching."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Plan:
    """A job config resolved once (tasks, codec context, columns, provenance); cheap to ship to workers."""

    cfg: JobConfig
    ctx: TaskContext
    tasks: list[Task]
    native_tasks: frozenset[str]
    profile: str
    model: str
    run_id: str
    input_schema: pa.Schema
    image_column: str | None = None
    uri_column: str | None = None
    # Backends, presets, profiles registered at run time in this process: workers replay them.
    registrations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, cfg: JobConfig, input_schema: pa.Schema, image_column=None, uri_column=None, run_id: str | None = None
    ) -> "Plan":
        """Resolve `cfg` for rows of `input_schema` (the source's, id column included)."""
        backend_cls = backend_class(cfg.model.backend)
        profile_name = cfg.model.profile or backend_cls.default_profile
        profile = get_profile(profile_name)
        if cfg.model.prompts:  # the job's own templates over the profile's, checked as a profile's are
            try:
                profile = dataclasses.replace(profile, templates={**profile.templates, **cfg.model.prompts})
            except ValueError as exc:
                raise ConfigError(f"model.prompts: {exc}") from None
        if cfg.model.state_url is None and cfg.output.path and backend_cls.needs_state_dir(cfg.model):
            # A backend with remote jobs (gemini batch) records them in the output, so a resumed run re-attaches.
            cfg.model.state_url = cfg.output.path.rstrip("/") + "/" + HOSTED_STATE_DIR
            cfg.model.state_storage = cfg.output.storage
        seg = cfg.segmentation
        try:
            legend = build_legend(seg.classes, seg.legend, seg.palette)
        except ValueError as exc:
            raise ConfigError(f"segmentation: {exc}") from None
        ctx = TaskContext(
            depth_preset=cfg.depth.preset or profile.depth_preset,
            depth_relative=profile.depth_relative,
            frame=cfg.normals.frame,
            legend=legend,
            max_distance=seg.max_distance,
            ensemble=seg.ensemble,
            phrase=cfg.referring.phrase,
            phrase_column=cfg.referring.phrase_column,
            templates=dict(profile.templates),
            fractions=seg.fractions,
        )
        return cls(
            cfg=cfg,
            ctx=ctx,
            tasks=[get_task(t) for t in cfg.tasks],
            native_tasks=frozenset(backend_cls.native_tasks_of(cfg)),
            profile=profile_name,
            model=model_id(cfg.model),
            run_id=run_id or new_run_id(),
            input_schema=input_schema,
            image_column=image_column,
            uri_column=uri_column,
            registrations=added_entries(),
        )

    def decodes_on_device(self, task: Task) -> bool:
        """Whether `task`'s paintings are decoded in the model worker: its answers are then values."""
        return self.cfg.model.decode_on_device and task.name not in self.native_tasks

    # ------------------------------------------------------------------ schema
    def column(self, task: Task, suffix: str = "") -> str:
        return f"{self.cfg.output.prefix}{task.name}{suffix}"

    def output_fields(self) -> list[pa.Field]:
        encoding = self.cfg.output.encoding
        fields = []
        grid = grid_metadata(self.cfg.output)
        for task in self.tasks:
            meta = {**task.column_meta(self.ctx, encoding).to_metadata(), **grid}
            fields.append(pa.field(self.column(task), storage_type(encoding), metadata=meta))
            fields.append(pa.field(self.column(task, "_confidence"), pa.float32()))
            fields += [pa.field(self.column(task, s), t) for s, t in task.summary_fields(self.ctx)]
        if grid:
            fields += [pa.field(name, pa.int32()) for name in image_size_columns(self.cfg.output)]
        fields.append(pa.field(ERROR_COLUMN, ERROR_TYPE))
        fields += [pa.field(name, pa.string()) for name in PROVENANCE_COLUMNS]
        return fields

    def kept_input_fields(self) -> list[pa.Field]:
        drop = self.image_column if not self.cfg.output.keep_image else None
        return [f for f in self.input_schema if f.name != drop]

    def output_schema(self) -> pa.Schema:
        fields = self.kept_input_fields()
        clash = {f.name for f in fields} & {f.name for f in self.output_fields()}
        if clash:
            raise ConfigError(
                f"output.prefix: output columns {sorted(clash)} already exist in the input; set output.prefix "
                "(e.g. output.prefix=vb_) or drop those columns from the input"
            )
        metadata = {
            b"vb.version": __version__.encode(),
            b"vb.run_id": self.run_id.encode(),
            b"vb.job": json.dumps(redacted(self.cfg)).encode(),
            b"vb.image_column": (self.image_column or "").encode(),
            b"vb.uri_column": (self.uri_column or "").encode(),
        }
        return pa.schema(fields + self.output_fields(), metadata=metadata)


# ---------------------------------------------------------------------------- helpers


def _column_list(batch: pa.RecordBatch, name: str) -> list[Any]:
    return batch.column(batch.schema.get_field_index(name)).to_pylist()


def _set_column(batch: pa.RecordBatch, name: str, values: pa.Array) -> pa.RecordBatch:
    index = batch.schema.get_field_index(name)
    if index >= 0:
        return batch.set_column(index, name, values)
    return batch.append_column(name, values)


def _errors(batch: pa.RecordBatch) -> list[dict[str, str] | None]:
    if batch.schema.get_field_index(ERROR_COLUMN) < 0:
        return [None] * batch.num_rows
    return _column_list(batch, ERROR_COLUMN)


def _arrays(batch: pa.RecordBatch, name: str) -> list[np.ndarray | None]:
    """An array column's cells as read-only numpy views of the batch's buffers."""
    return column_to_arrays(batch.column(batch.schema.get_field_index(name)))


def _images(batch: pa.RecordBatch) -> list[np.ndarray | None]:
    return _arrays(batch, IMAGE_COLUMN)


# ---------------------------------------------------------------------------- stage 1


# Backends that resize every image to about processing_resolution**2 pixels (Marigold: that longer
# side) before the model sees it, with their default resolution (None: the checkpoint's, not known here).
_RESIZING_BACKENDS: dict[str, int | None] = {"diffusers": 1024, "marigold": None, "demo": None}
# Margins of `needed_size` over the model's working size: an aspect bucket stretches a side by up to
# 7.5% (half the 3:1 to 4:1 gap), sides rounded to a multiple (16; Qwen's grid 32) gain at most half
# of it, no working side is under 64 px (klein's minimum), and the farthest aspect bucket (Kontext's
# 2.3:1) keeps a short side of 0.66 R.
_WORKING_STRETCH = 1.08
_WORKING_SLACK = 16
_WORKING_MIN_SIDE = 64
_WORKING_MIN_FRACTION = 0.7


def model_resolution(cfg: JobConfig) -> int | None:
    """R such that the model works on at most about R*R pixels of an image, if known before loading.

    None: the model may work at the input's own size (identity, http, hosted, `processing_resolution: 0`,
    or a default only the checkpoint knows), so images are decoded in full. A user's backend
    class may declare `working_resolution(model_cfg) -> int | None` to get reduced decoding too.
    """
    model = cfg.model
    if model.processing_resolution == 0:
        return None
    if model.backend in _RESIZING_BACKENDS:
        return model.processing_resolution or _RESIZING_BACKENDS[model.backend]
    if model.backend in ("identity", "http"):
        return None
    declared = getattr(backend_class(model.backend), "working_resolution", None)
    return declared(model) if callable(declared) else None


def needed_size(resolution: int, height: int, width: int) -> tuple[int, int]:
    """The smallest (h, w) a model working at about `resolution`**2 pixels may need of a (height, width) image.

    Conservative for every built-in sizing rule, exact or bucketed (tests sweep it against
    `vb_batch.models.sizing`): an equal-area working size has sides of about side * R / sqrt(area);
    Marigold's longer side R is below that; a bucket stretches a side by a few percent, and an
    image more elongated than its farthest bucket keeps a short side of at least 0.66 R.
    """
    scale = max(resolution / math.sqrt(height * width), _WORKING_MIN_SIDE / min(height, width)) * _WORKING_STRETCH
    floor = math.ceil(resolution * _WORKING_MIN_FRACTION)
    return tuple(min(side, max(math.ceil(side * scale), floor) + _WORKING_SLACK) for side in (height, width))


def _needed(plan: Plan) -> NeededSize | None:
    resolution = model_resolution(plan.cfg)
    return None if resolution is None else (lambda height, width: needed_size(resolution, height, width))


# Per-row CPU work of a batch (decoding, resizing, encoding) runs on these threads: Pillow, zlib,
# OpenCV and numpy release the GIL, and on 2 cores the engine gives the CPU stages one thread.
ROW_THREADS = max(1, min(4, os.cpu_count() or 1))
_row_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it: a forked child makes its own)
_row_pool_lock = threading.Lock()


def map_rows(fn, items: list) -> list:
    """[fn(item) for item in items] on `ROW_THREADS` threads shared by the process, in order.

    `fn` guards its own row (it returns errors, never raises them). Each thread books its
    phases into the caller's collector, so the stage's seconds are summed over threads.
    """
    global _row_pool
    if ROW_THREADS == 1 or len(items) < 2:
        return [fn(item) for item in items]
    with _row_pool_lock:
        if _row_pool is None or _row_pool[0] != os.getpid():
            _row_pool = (os.getpid(), ThreadPoolExecutor(ROW_THREADS, thread_name_prefix="vb-rows"))
        pool = _row_pool[1]
    times = current()
    return list(pool.map(lambda item: run_collecting(times, fn, item), items))


def fetch_decode(batch: pa.RecordBatch, plan: Plan) -> pa.RecordBatch:
    """Stage 1 (CPU): read each row's image (bytes or URI) and decode it to RGB uint8, rows in parallel.

    A JPEG far larger than the model's working size decodes reduced (`model_resolution`,
    `needed_size`); the whole image's size goes to `IMAGE_SIZE_COLUMN` for the output grid.
    """
    cfg = plan.cfg.input
    with phase("fetch_decode"):
        if plan.image_column:
            cells = image_bytes(batch.column(batch.schema.get_field_index(plan.image_column))).to_pylist()
        else:
            cells = _column_list(batch, plan.uri_column)
        errors = _errors(batch)
        needed = _needed(plan)

    def fetch_one(i: int):
        if errors[i] is not None:
            return None, None, errors[i]
        with phase("fetch_decode"):
            try:
                data = cells[i] if plan.image_column else read_uri(cells[i], cfg)
                decoded = decode_for_model(data, cfg.max_pixels, cfg.min_side, cfg.image_formats, cfg.max_bytes, needed)
                return decoded.pixels, list(decoded.size), None
            except Exception as exc:  # noqa: BLE001 - the row guard: whatever one row raises is its own error
                return None, None, row_error(exc, "internal_error", "fetch and decode: ")

    rows = map_rows(fetch_one, list(range(len(cells))))
    with phase("fetch_decode"):
        batch = _set_column(batch, IMAGE_COLUMN, arrays_to_column([image for image, _, _ in rows]))
        batch = _set_column(batch, IMAGE_SIZE_COLUMN, pa.array([size for _, size, _ in rows], IMAGE_SIZE_TYPE))
        return _set_column(batch, ERROR_COLUMN, pa.array([error for _, _, error in rows], ERROR_TYPE))


# ---------------------------------------------------------------------------- stage 2


def check_backend(plan: Plan, backend: ModelBackend) -> None:
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


def row_error(exc: BaseException, code: str, context: str = "") -> dict[str, str]:
    """The `vb_error` cell of one row whose step raised `exc`: its own code for a `RowError`, else `code`.

    Every per-row step (fetch, decode, model answer, codec decode, resize, encode)
    ends in this guard, so no exception of one row can stop a job; only faults of
    the job itself (config, output, model load) do.
    """
    if isinstance(exc, RowError):
        return exc.as_cell()
    return {"code": code, "message": f"{context}{type(exc).__name__}: {exc}"}


def _output_error(task: Task, exc: Exception) -> dict[str, str]:
    return row_error(exc, "output_error", f"{task.name}: ")


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
            errors[index[0]] = errors[index[0]] or _output_error(task, exc)
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


def run_model(batch: pa.RecordBatch, plan: Plan, backend: ModelBackend) -> pa.RecordBatch:
    """Stage 2 (GPU) on one batch: one answer per valid row, task and ensemble pass.

    Rows are grouped by the backend's `batch_key` into calls of at most `model.batch_size`
    (`ModelBatcher`); paintings are decoded here when `decode_on_device`.
    """
    batcher = ModelBatcher(plan, backend, window=0)
    (answered,) = batcher.add(batch) + batcher.flush()
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

    def __init__(self, plan: Plan, backend: ModelBackend, window: int | None = None):
        self.plan, self.backend = plan, backend
        self.size = plan.cfg.model.batch_size
        self.window = group_window(plan.cfg) if window is None else window
        self.batches: deque[_Waiting] = deque()
        self.pools: dict[Any, list[tuple[int, _Waiting, int]]] = {}  # key -> (arrival, batch, row)
        self.waiting = 0  # valid rows in the pools
        self.held = 0  # valid rows of the batches not handed back yet
        self.arrivals = itertools.count()
        self.passes = [(t, p) for t, task in enumerate(plan.tasks) for p in range(task.passes(plan.ctx))]

    def add(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Take one decoded batch; return the batches now answered (the oldest first)."""
        images, errors = _images(batch), _errors(batch)
        rows = [i for i, image in enumerate(images) if image is not None and errors[i] is None]
        ids = _column_list(batch, self.plan.cfg.input.id_column)
        seeds: list[int | None] = [None] * batch.num_rows
        for i in rows:
            seeds[i] = row_seed(self.plan.cfg.model.seed, ids[i])
        phrases = None
        if self.plan.ctx.phrase_column:
            phrases = [p or self.plan.ctx.phrase or "" for p in _column_list(batch, self.plan.ctx.phrase_column)]
        entry = _Waiting(batch, images, errors, seeds, phrases,
                         {key: [None] * batch.num_rows for key in self.passes}, len(rows), len(rows))
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
        return self._answered()

    def _oldest(self) -> Any:
        return min(self.pools, key=lambda key: self.pools[key][0][0])

    def _call(self, key: Any) -> None:
        """One model call per task and pass on the pool of `key` (at most batch_size rows)."""
        pool = self.pools.pop(key)
        members, rest = pool[: self.size], pool[self.size :]
        if rest:
            self.pools[key] = rest
        self.waiting -= len(members)
        images = [entry.images[i] for _, entry, i in members]
        seeds = [entry.seeds[i] for _, entry, i in members]
        phrases = None if self.plan.ctx.phrase_column is None else [entry.phrases[i] for _, entry, i in members]
        for t, p in self.passes:
            task = self.plan.tasks[t]
            prompts = task.prompts(self.plan.ctx, len(members), p, phrases)
            with phase("model"):
                results = _predict_rows(self.backend, images, prompts, task.name, seeds)
            count("model_calls")
            count("model_images", len(images))
            for (_, entry, i), result in zip(members, results):
                try:
                    entry.answers[t, p][i] = model_answer(result)
                except Exception as exc:  # noqa: BLE001 - the row guard: a bad answer is this row's error
                    entry.errors[i] = entry.errors[i] or row_error(exc, "model_bad_answer", f"{task.name}: ")
        for _, entry, _ in members:
            entry.left -= 1

    def _answered(self) -> list[pa.RecordBatch]:
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
                batch = _set_column(batch, confidence_column(task.name, p), arrays_to_column(confidences))
            batch = _set_column(batch, answer_column(task.name, p), arrays_to_column(answers))
        return _set_column(batch, ERROR_COLUMN, pa.array(entry.errors, ERROR_TYPE))


def group_window(cfg: JobConfig) -> int:
    """`model.group_window`: how many rows may wait for others of their working size (default 4 batches)."""
    window = cfg.model.group_window
    return 4 * cfg.model.batch_size if window is None else window


def model_rows_at_once(cfg: JobConfig) -> int:
    """Rows one model task takes at once where rows cannot wait across tasks (a Ray actor's call).

    `batch_size`, plus `group_window` for a backend with working sizes (`batch_key`), known from its
    class without loading it: the task groups them into calls of at most `batch_size`.
    """
    keyed = getattr(backend_class(cfg.model.backend), "batch_key", None) is not ModelBackend.batch_key
    return cfg.model.batch_size + (group_window(cfg) if keyed else 0)


# ---------------------------------------------------------------------------- stage 3


def resize_values(values: np.ndarray, kind: str, size: tuple[int, int]) -> np.ndarray:
    """Map a decoded map onto an (H, W) grid: nearest for ids and masks, bilinear for depth and normals.

    Nearest: output pixel (i, j) takes source (i * h // H, j * w // W), exactly. Bilinear: Pillow's
    BILINEAR (pixel centres aligned, source x = (j + 0.5) * w / W - 0.5; antialiased when shrinking).
    Enlarging, the common case (a working-size answer onto a photo's grid), runs as OpenCV's
    INTER_LINEAR on all channels at once, equal to Pillow's within float32 rounding (13-20x
    faster; pinned by tests/test_photos.py); shrinking keeps Pillow. A non-finite source pixel
    makes every output pixel it weighs in non-finite: NaN (invalid) if any NaN does, else +inf
    (far). Normals are renormalised.
    """
    height, width = size
    if values.shape[:2] == (height, width):
        return values
    if kind in ("classes", "mask"):
        rows = np.arange(height) * values.shape[0] // height
        cols = np.arange(width) * values.shape[1] // width
        return np.take(np.take(values, rows, axis=0), cols, axis=1)
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if finite.all():
        resized = _bilinear(values, size)
    else:
        # Pillow alone here: which taps weigh in must be the same for the values and the hole masks.
        resized = _bilinear(np.where(finite, values, np.float32(0)), size, fast=False)
        # Where a far (+inf) or invalid pixel weighs in, the output is far or invalid, never a blend.
        far = _bilinear(np.isposinf(values).astype(np.float32), size, fast=False) > 0
        invalid = _bilinear((~finite & ~np.isposinf(values)).astype(np.float32), size, fast=False) > 0
        resized[far] = np.inf
        resized[invalid] = np.nan
    if kind == "normals":
        norm = np.sqrt(np.einsum("...c,...c->...", resized, resized))[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
            resized /= norm
    return resized


def _bilinear(values: np.ndarray, size: tuple[int, int], fast: bool = True) -> np.ndarray:
    """float32 (h, w[, c]) -> (H, W[, c]), Pillow's BILINEAR; OpenCV's equal kernel when enlarging both sides.

    A side kept at its size, and a map with far or invalid pixels (`fast=False`), stay with
    Pillow: the two kernels differ in which zero-weight taps they read at edges and equal sides,
    so a hole would spread differently.
    """
    height, width = size
    if fast and height > values.shape[0] and width > values.shape[1]:
        return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    channels = values[..., None] if values.ndim == 2 else values
    resized = np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c]), mode="F").resize((width, height), Image.BILINEAR))
         for c in range(channels.shape[-1])],
        axis=-1,
    )
    return resized[..., 0] if values.ndim == 2 else resized


def grid_metadata(output: OutputConfig) -> dict[bytes, bytes]:
    """Field metadata of a map column stored off the image's grid (none at the default: old outputs keep their fingerprint)."""
    if output.resolution == "input" and output.max_side is None:
        return {}
    height, width = image_size_columns(output)
    meta = {
        "grid": output.resolution,
        # How a stored pixel maps onto the image (pixel centres aligned) and how camera intrinsics follow.
        "grid_to_image": (
            f"x_image = (x + 0.5) * {width} / map_width - 0.5, y_image = (y + 0.5) * {height} / map_height - 0.5; "
            f"intrinsics (pixel centres at +0.5): fx, cx times map_width / {width}, fy, cy times map_height / {height}"
        ),
    }
    if output.max_side is not None:
        meta["max_side"] = str(output.max_side)
    return {f"vb.{k}".encode(): v.encode() for k, v in meta.items()}


def image_size_columns(output: OutputConfig) -> tuple[str, str]:
    """The columns holding each row's image (height, width), written when maps are stored off its grid."""
    return f"{output.prefix}image_height", f"{output.prefix}image_width"


def stored_grid(output: OutputConfig, image_size: tuple[int, int], answer_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) a map is stored at: the image's or the model's answer's grid, its longer side capped at `max_side`."""
    height, width = image_size if output.resolution == "input" else answer_size
    if output.max_side is not None and max(height, width) > output.max_side:
        scale = output.max_side / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


def decode_answer(task: Task, answers: list[np.ndarray], plan: Plan, confidences: list | None = None) -> Decoded:
    """One row's answers (one per pass) -> the values to store: native values, decoded passes, or paintings."""
    if task.name in plan.native_tasks:
        values = answers[0].astype(np.float32)
        if task.kind == "normals":
            # Native normals come in the OpenGL frame (Marigold's); store them in the configured one.
            values = normals_codec.convert(values, "opengl", plan.ctx.frame)
        return Decoded(values=values, confidence=None)
    if plan.decodes_on_device(task):
        return task.combine([Decoded(v, c) for v, c in zip(answers, confidences)], plan.ctx)
    return task.decode(answers, plan.ctx)


def decode_encode(batch: pa.RecordBatch, plan: Plan) -> pa.RecordBatch:
    """Stage 3 (CPU): decode answers, encode for storage, add summaries and provenance; rows in parallel.

    Summary scalars are computed on the decoded map at the grid the model answered at, before
    any resize: the same values whatever `output.resolution` / `output.max_side` store.
    """
    errors = _errors(batch)
    output = plan.cfg.output
    sizes = _image_sizes(batch)
    encoding = output.encoding
    outputs: dict[str, list[Any]] = {f.name: [None] * batch.num_rows for f in plan.output_fields()}
    if grid_metadata(output):
        for name, axis in zip(image_size_columns(output), (0, 1)):
            outputs[name] = [None if size is None else size[axis] for size in sizes]
    work = []
    for task in plan.tasks:
        num_passes = task.passes(plan.ctx)
        passes = [_arrays(batch, answer_column(task.name, p)) for p in range(num_passes)]
        pass_confidences = (
            [_arrays(batch, confidence_column(task.name, p)) for p in range(num_passes)]
            if plan.decodes_on_device(task)
            else None
        )
        work.append((task, task.column_meta(plan.ctx, encoding), passes, pass_confidences))

    def encode_row(i: int) -> tuple[dict[str, Any], dict[str, str] | None]:
        """One row's output cells for every task, in task order; the first failing task ends the row."""
        cells: dict[str, Any] = {}
        for task, meta, passes, pass_confidences in work:
            try:
                with phase("codec_decode"):
                    confidences = None if pass_confidences is None else [c[i] for c in pass_confidences]
                    decoded = decode_answer(task, [answers[i] for answers in passes], plan, confidences)
                    values = np.asarray(decoded.values)
                with phase("encode"):
                    summary = task.summarise(values, plan.ctx)
                    confidence = None if decoded.confidence is None else float(np.mean(decoded.confidence))
                with phase("resize"):
                    values = resize_values(values, task.kind, stored_grid(output, sizes[i], values.shape[:2]))
                with phase("encode"):
                    cell = encode_map(values, meta, output.png_compression)
            except Exception as exc:  # noqa: BLE001 - a bad answer is this row's fault
                return cells, _output_error(task, exc)
            cells[plan.column(task)] = cell
            cells[plan.column(task, "_confidence")] = confidence
            cells.update({plan.column(task, suffix): value for suffix, value in summary.items()})
        return cells, None

    rows = [i for i in range(batch.num_rows) if errors[i] is None and sizes[i] is not None]
    for i, (cells, error) in zip(rows, map_rows(encode_row, rows)):
        for name, value in cells.items():
            outputs[name][i] = value
        errors[i] = error
    outputs[ERROR_COLUMN] = errors
    provenance = {"vb_model": plan.model, "vb_profile": plan.profile, "vb_run_id": plan.run_id, "vb_version": __version__}
    for name, value in provenance.items():
        outputs[name] = [value] * batch.num_rows
    schema = plan.output_schema()
    kept = [batch.column(batch.schema.get_field_index(f.name)) for f in plan.kept_input_fields()]
    produced = [pa.array(outputs[f.name], type=f.type) for f in plan.output_fields()]
    return pa.RecordBatch.from_arrays(kept + produced, schema=schema)


def _image_sizes(batch: pa.RecordBatch) -> list[tuple[int, int] | None]:
    """Each row's whole-image (height, width): `IMAGE_SIZE_COLUMN`, else its decoded pixels' shape."""
    if batch.schema.get_field_index(IMAGE_SIZE_COLUMN) >= 0:
        return [None if size is None else tuple(size) for size in _column_list(batch, IMAGE_SIZE_COLUMN)]
    # Only the shapes: reading the whole struct would copy every image's raw pixels into Python.
    shapes = pc.struct_field(batch.column(batch.schema.get_field_index(IMAGE_COLUMN)), "shape").to_pylist()
    return [None if shape is None else tuple(shape[:2]) for shape in shapes]


def annotate_batch(batch: pa.RecordBatch, plan: Plan, backend: ModelBackend) -> pa.RecordBatch:
    """All three stages in one call (for a caller that has no reason to split them)."""
    return decode_encode(run_model(fetch_decode(batch, plan), plan, backend), plan)
