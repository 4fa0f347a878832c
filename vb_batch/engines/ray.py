"""The Ray engine: the same stages as Ray Data operators, the model in an actor pool.

    units    [driver]     Source.units(): row groups of the input files, or slices of an image listing
    prepare  [CPU tasks]  read_unit, ids, resume filter, fetch_decode     engine.cpu_batch_rows, block_bytes
    model    [actors]     run_model, one backend per actor                model.batch_size, group_window,
                                                                          engine.actors, gpus_per_actor,
                                                                          cpus_per_actor
    finish   [CPU tasks]  decode_encode, one staged part file per block   block_bytes, model.batch_size, cpus_per_task
    compact  [CPU tasks]  merge small parts into files of rows_per_file   output.rows_per_file
    commit   [driver]     the run core (vb_batch.engines.core): stage, commit, modes, resume, _SUCCESS

Reading: the prepare tasks read the units with `read_unit` (an explicit
pyarrow filesystem from `input.storage`), as the Spark engine does, rather than
with `ray.data.read_parquet`: the units carry what the source knows and Ray's
reader does not (`input.filter` pruning, partition values of lake tables), so
every engine reads exactly the same rows.

Writing: every finish task writes its block's rows (decoded and encoded one
model batch at a time: a task's memory stays small on large photos) as a small
part file into the sink's staging directory, with the sink's schema, and
returns its part report (`PART_SCHEMA`:
file, rows, error codes, model seconds and nodes, seconds per phase). The
driver counts each report, and as soon as the small files add up to
`output.rows_per_file` rows it starts a compact task that streams them into
files of exactly that many rows (the remainder goes back to the pool; the last
file of the run holds fewer) and deletes them. Only the compacted files are
staged in the sink, which commits them exactly as it commits its own files
(every `output.commit_every` rows, and at the end; a Parquet dataset, or a
Delta / Iceberg table through its log). So output bytes never pass through the
driver, and a file nobody staged (a retried or killed task) is never
committed and goes away with the staging directory: rows are neither lost nor
duplicated.

Memory: a prepare task yields a block once its decoded images reach
`engine.block_bytes` (or `cpu_batch_rows` rows); the model actor hands on
only the images' shapes, not their pixels, so a finish task holds one block of
answers (in the object store) and one model batch of decoded maps and outputs.
Ray Data's own limits are set for the run (`bound_memory`): blocks of at most
`block_bytes`, an object-store budget of `OBJECT_STORE_BLOCKS` blocks,
`max_tasks_in_flight_per_actor`. Ray's output buffer joins what a task yields
into blocks of up to `block_bytes`, so with small images a block is a whole unit
(measured: 250-row blocks of 52 MB at 256 px); the finish tasks take blocks as
they come, one task and one part file each.

Cluster: `engine.address` unset starts a private local Ray for the job (or joins
RAY_ADDRESS when that is set), never a cluster that merely runs on the host;
`auto` or an address joins one (`ray_init_args`).

`output.mode: resume` drops the committed ids in the prepare tasks, before the
model sees them. The driver needs no GPU and never loads the model. The run
record (`_vb/runs/<run_id>.json`) says on which nodes the model ran:
`model_nodes: {node id: rows}`.

Mixed sizes: for a backend with working sizes (`batch_key`), an actor takes
`model.batch_size + model.group_window` rows at a time and `run_model` groups
them by working size into calls of at most `batch_size` (a Ray Data actor
cannot hold rows back across calls, as the local and Spark engines'
`ModelBatcher` does across batches). Other backends take `batch_size` rows.

Ray fuses the prepare tasks into the model actors when both ask for the same
resources (a CPU-only pool with `cpus_per_task == cpus_per_actor`); with
`gpus_per_actor > 0` they always stay separate operators, so decoding never
holds up a GPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vb_batch.config import ConfigError, EngineConfig, JobConfig
from vb_batch.engines.core import Engine, Run
from vb_batch.engines.resume import ResumeFilter
from vb_batch.io.filesystems import split_scheme
from vb_batch.io.sinks.staging import PART_SCHEMA, Compactor, StagedParts, compact
from vb_batch.io.sources import Source, read_unit, with_ids
from vb_batch.pipeline.columns import IMAGE_COLUMN
from vb_batch.pipeline.inputs import fetch_decode
from vb_batch.pipeline.model import model_rows_at_once, run_model
from vb_batch.pipeline.outputs import decode_encode
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.pipeline.stream import cached_backend
from vb_batch.timing import COUNTS, PHASES, PhaseTimes, collecting

log = logging.getLogger(__name__)

NODE_COLUMN = "_vb_model_node"
MODEL_SECONDS_COLUMN = "_vb_model_seconds"  # the batch's time in the model actor, spread evenly over its rows
MODEL_WAIT_COLUMN = "_vb_model_input_wait_seconds"  # the actor's idle time before the batch, spread likewise
PHASE_PREFIX = "_vb_seconds_"  # a phase's seconds in prepare and model, spread evenly over the rows
# Process-local storage: Ray workers would each see their own, empty one.
PROCESS_LOCAL_SCHEMES = ("memory",)


def record_batch(table: pa.Table) -> pa.RecordBatch:
    """Ray hands `batch_format="pyarrow"` batches over as tables; the stages take one record batch."""
    batches = table.combine_chunks().to_batches()  # one chunk per column: one batch, or none if empty
    if batches:
        return batches[0]
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in table.schema], schema=table.schema)


# ---------------------------------------------------------------------------- the three operators


def spread_phases(batch: pa.RecordBatch, times: PhaseTimes) -> pa.RecordBatch:
    """Add `times` to the batch as per-row seconds columns, for the operator that reports them."""
    rows = max(1, batch.num_rows)
    for name, seconds in times.as_dict().items():
        column = PHASE_PREFIX + name
        values = np.full(batch.num_rows, seconds / rows)
        index = batch.schema.get_field_index(column)
        if index >= 0:
            values += batch.column(index).to_numpy(zero_copy_only=False)
            batch = batch.remove_column(index)
        batch = batch.append_column(column, pa.array(values, pa.float64()))
    return batch


def gather_phases(batch: pa.RecordBatch, times: PhaseTimes) -> pa.RecordBatch:
    """Move the per-row seconds columns of `spread_phases` into `times`; the batch without them."""
    for name in PHASES + COUNTS:
        index = batch.schema.get_field_index(PHASE_PREFIX + name)
        if index >= 0:
            times.add(name, float(pc.sum(batch.column(index)).as_py() or 0.0))
            batch = batch.remove_column(index)
    return batch


def prepare(units: pa.Table, plan: ResolvedJob, source_schema: pa.Schema, resume: ResumeFilter) -> Iterator[pa.Table]:
    """CPU task: read units, give rows their ids, drop the ids already committed (resume), fetch and decode images.

    Rows are decoded one model batch at a time and handed on once the decoded images reach
    `engine.block_bytes` (or `cpu_batch_rows` rows), so a task never holds many large photos.
    """
    cfg = plan.cfg
    pending: list[pa.RecordBatch] = []
    pending_rows = pending_bytes = 0
    times = PhaseTimes()

    def block() -> pa.Table:
        nonlocal pending, pending_rows, pending_bytes, times
        table = pa.Table.from_batches([spread_phases(record_batch(pa.Table.from_batches(pending)), times)])
        pending, pending_rows, pending_bytes, times = [], 0, 0, PhaseTimes()
        return table

    for unit in units.column("unit").to_pylist():
        batches = read_unit(json.loads(unit), cfg.input, source_schema, cfg.engine.cpu_batch_rows)
        while True:
            with collecting(times):  # never across a yield: the context would leak into Ray's
                batch = next(batches, None)
                if batch is None:
                    break
                batch, _ = resume.apply(with_ids(batch, cfg.input.id_column, plan.image_column, plan.uri_column))
                decoded = []
                for start in range(0, batch.num_rows, cfg.model.batch_size):
                    decoded.append(fetch_decode(batch.slice(start, cfg.model.batch_size), plan))
            for piece in decoded:
                if pending and pending[0].schema != piece.schema:  # e.g. an all-null column: its own block
                    yield block()
                pending.append(piece)
                pending_rows += piece.num_rows
                pending_bytes += piece.column(piece.schema.get_field_index(IMAGE_COLUMN)).nbytes
                if pending_bytes >= cfg.engine.block_bytes or pending_rows >= cfg.engine.cpu_batch_rows:
                    yield block()
    if pending:
        yield block()


def shapes_only(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with its decoded images' pixels dropped, their shapes kept (all `decode_encode` reads)."""
    index = batch.schema.get_field_index(IMAGE_COLUMN)
    images = batch.column(index)
    empty = pa.array([b""] * len(images), pa.binary())
    children = [empty if f.name == "data" else images.field(f.name) for f in images.type]
    slim = pa.StructArray.from_arrays(children, fields=list(images.type), mask=images.is_null())
    return batch.set_column(index, batch.schema.field(index), slim)


class ModelActor:
    """One per actor in the pool: builds the backend once, then runs `run_model` on each batch.

    It records the node it runs on in every row (dropped by `finish`), so the run
    record can say where the model ran, and its seconds in `run_model` and idle
    before the call (since it was built or its last call returned: Ray Data does
    not say whether for lack of input or because its output was not taken).
    """

    def __init__(self, plan: ResolvedJob):
        import ray

        self.plan = plan
        self.backend = cached_backend(plan)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.idle_since = time.perf_counter()

    def __call__(self, table: pa.Table) -> pa.Table:
        times = PhaseTimes()
        started = time.perf_counter()
        waited = started - self.idle_since
        with collecting(times):
            batch = run_model(record_batch(table), self.plan, self.backend)
        seconds = (time.perf_counter() - started) / max(1, batch.num_rows)
        batch = spread_phases(shapes_only(batch), times)
        batch = batch.append_column(NODE_COLUMN, pa.array([self.node_id] * batch.num_rows, pa.string()))
        batch = batch.append_column(MODEL_SECONDS_COLUMN, pa.array([seconds] * batch.num_rows, pa.float64()))
        wait = waited / max(1, batch.num_rows)
        batch = batch.append_column(MODEL_WAIT_COLUMN, pa.array([wait] * batch.num_rows, pa.float64()))
        self.idle_since = time.perf_counter()
        return pa.Table.from_batches([batch])


@contextlib.contextmanager
def row_threads(count: int) -> Iterator[None]:
    """`map_rows` on at most `count` threads in this worker while the block runs, restored after.

    Ray runs as many CPU tasks as it has CPUs, each holding `cpus_per_task`: a finish task's
    codec decode and encode are CPU-bound, and more threads than its CPUs only contend (on 2 CPUs:
    1.85 against 1.97 ms of CPU per 256 px depth row, one thread against two). Prepare tasks keep
    theirs: fetching URIs waits on the network. The worker runs other tasks after this one.
    """
    from vb_batch.pipeline import rows

    saved = rows.ROW_THREADS
    rows.ROW_THREADS = max(1, min(saved, count))
    try:
        yield
    finally:
        rows.ROW_THREADS = saved


def finish(table: pa.Table, plan: ResolvedJob, staging: str) -> pa.Table:
    """CPU task: decode and encode a block of answers, write it as one staged part file, return its part reports.

    The block is decoded and encoded one model batch at a time, each written to the part file
    as it comes, so a task holds its input block (in the object store) and one model batch of
    decoded maps, whatever the block's size.
    """
    batch = record_batch(table)
    if batch.num_rows == 0:
        return PART_SCHEMA.empty_table()
    times = PhaseTimes()
    batch = gather_phases(batch, times)
    nodes = dict(Counter(batch.column(batch.schema.get_field_index(NODE_COLUMN)).to_pylist()))
    model_seconds = float(pc.sum(batch.column(batch.schema.get_field_index(MODEL_SECONDS_COLUMN))).as_py())
    model_wait = float(pc.sum(batch.column(batch.schema.get_field_index(MODEL_WAIT_COLUMN))).as_py())
    step = plan.cfg.model.batch_size
    reports: list[dict[str, Any]] = []
    with collecting(times), row_threads(int(plan.cfg.engine.cpus_per_task)):
        parts = StagedParts(plan, staging, uuid.uuid4().hex[:16], times)
        for start in range(0, batch.num_rows, step):
            first = start == 0
            out = decode_encode(batch.slice(start, step), plan)
            reports += parts.write(out, model_seconds if first else 0.0, nodes if first else None)
        reports += parts.close()
    reports[0].update(model_input_wait_seconds=model_wait, model_output_wait_seconds=0.0)
    return pa.Table.from_pylist(reports, schema=PART_SCHEMA)


# ---------------------------------------------------------------------------- wiring


def actor_pool(engine: EngineConfig):
    from ray.data import ActorPoolStrategy

    in_flight = engine.max_tasks_in_flight_per_actor or engine.prefetch_batches
    if isinstance(engine.actors, int):
        return ActorPoolStrategy(size=engine.actors, max_tasks_in_flight_per_actor=in_flight)
    low, high = engine.actors
    return ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=in_flight)


def read_units(cfg: JobConfig, source: Source):
    """A dataset of the source's units of work (JSON), one per block so that prepare tasks spread them."""
    import ray.data

    units = [{"unit": json.dumps(unit)} for unit in source.units(cfg.engine.cpu_batch_rows, cfg.engine.unit_rows)]
    return ray.data.from_items(units, override_num_blocks=max(1, len(units)))


def build_dataset(run: Run):
    """units -> prepare (CPU tasks) -> model (actor pool) -> finish (CPU tasks): a dataset of part reports."""
    cfg, plan, engine = run.cfg, run.plan, run.cfg.engine
    ds = read_units(cfg, run.source).map_batches(
        prepare,
        batch_format="pyarrow",
        batch_size=1,
        fn_kwargs={"plan": plan, "source_schema": run.source.dataset.schema, "resume": run.resume},
        num_cpus=engine.cpus_per_task,
    )
    ds = ds.map_batches(
        ModelActor,
        batch_format="pyarrow",
        batch_size=model_rows_at_once(cfg),  # grouped by working size into calls of batch_size
        fn_constructor_kwargs={"plan": plan},
        compute=actor_pool(engine),
        num_gpus=engine.gpus_per_actor,
        num_cpus=engine.cpus_per_actor,
    )
    return ds.map_batches(
        finish,
        batch_format="pyarrow",
        # Whole blocks (cut at `block_bytes`), not model batches: one task and one part file per block, so
        # the finish operator runs as few, CPU-sized tasks as the hand-written pipelines do; `finish`
        # still decodes one model batch at a time. 2,000 rows of 256 px, 2 Ray CPUs, loaded machine:
        # 9.08 s of CPU for the job against 9.97 s with a task per model batch (median of 3).
        batch_size=None,
        fn_kwargs={"plan": plan, "staging": run.sink.staging},
        num_cpus=engine.cpus_per_task,
    )


# Blocks of `engine.block_bytes` the streaming executor may hold in the object store at once, over all
# operators: enough for one full block running in the model actor and one waiting, plus the small ones
# (units, answers' shapes); more only adds memory, not speed. Measured at 128 px, 10k rows, one run each
# (noisy): the largest worker's unique object-store pages were 319 / 39 / 106 MB with 8 / 4 / 2 blocks,
# at 143 / 125 / 160 rows/s; 111 MB at 20k rows with 4 (benchmarks/results/memory-ray-bounded.json).
OBJECT_STORE_BLOCKS = 4


def bound_memory(context, engine: EngineConfig) -> None:
    """Ray Data's memory limits for a run, set deliberately rather than left to the cluster's size.

    - `target_max_block_size = engine.block_bytes`: Ray splits an operator's output at the same
      bound as `prepare` cuts its blocks of decoded images;
    - `execution_options.resource_limits.object_store_memory = OBJECT_STORE_BLOCKS * block_bytes`
      (512 MiB at the default 128 MiB): the streaming executor stops launching tasks upstream once
      that much waits in the object store (by default the limit is a share of the cluster's store,
      which grows with the machine, not with what the job needs);
    - tasks in flight on each model actor: `engine.max_tasks_in_flight_per_actor` (`actor_pool`).
    Worker memory then follows these settings and the batch sizes, not the input's size.
    """
    context.target_max_block_size = engine.block_bytes
    limits = context.execution_options.resource_limits
    budget = OBJECT_STORE_BLOCKS * engine.block_bytes
    context.execution_options.resource_limits = limits.copy(object_store_memory=budget)


def connect(engine: EngineConfig) -> bool:
    """Connect to Ray as `engine.address` says; True when this call started the connection (and so ends it).

    A Ray this process already joined is used as it is. Otherwise `ray.init` gets `ray_init_args`.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(**ray_init_args(engine.address, os.environ))
    return True


def ray_init_args(address: str | None, environ: Mapping[str, str]) -> dict[str, Any]:
    """`ray.init`'s arguments for `engine.address`.

    None: RAY_ADDRESS when it is set (an explicit choice: Ray Jobs sets it for the drivers it
    starts), else a private local Ray started for this job and stopped after it, never one that
    happens to run on the host (Ray's own `address=None` would join that). "auto" or an address
    (host:port, ray://head:10001): join that cluster ("auto": the one on this host, or
    RAY_ADDRESS; none running is an error). "local": a private local Ray even with RAY_ADDRESS set.

    >>> ray_init_args(None, {})
    {'address': 'local', 'include_dashboard': False}
    >>> ray_init_args(None, {"RAY_ADDRESS": "10.0.0.5:6379"}), ray_init_args("auto", {})
    ({'address': '10.0.0.5:6379'}, {'address': 'auto'})
    """
    if address is None:
        address = environ.get("RAY_ADDRESS") or "local"
    return {"address": "local", "include_dashboard": False} if address == "local" else {"address": address}


class RayEngine(Engine):
    """Ray Data: CPU tasks decode and encode, an actor pool runs the model, the driver commits."""

    name = "ray"

    def check(self, cfg: JobConfig, backend) -> None:
        super().check(cfg, backend)
        for key, url in (("input.path", cfg.input.path), ("output.path", cfg.output.path)):
            if split_scheme(url)[0] in PROCESS_LOCAL_SCHEMES:
                raise ConfigError(f"{key}: {url!r} lives in one process; the ray engine needs storage every worker reaches")

    @contextlib.contextmanager
    def session(self, run: Run, backend) -> Iterator[None]:
        import ray
        from ray.data import DataContext

        owns_connection = connect(run.cfg.engine)
        context = DataContext.get_current()
        saved = (context.enable_progress_bars, context.target_max_block_size, context.execution_options.resource_limits)
        context.enable_progress_bars = False  # ours counts committed rows
        bound_memory(context, run.cfg.engine)
        try:
            from vb_batch.models.quota_share import ray_rate_limiter

            with ray_rate_limiter(run.plan):  # a hosted model's limits, shared by every actor (issue 33)
                yield None
        finally:
            context.enable_progress_bars, context.target_max_block_size, limits = saved
            context.execution_options.resource_limits = limits
            if owns_connection:
                ray.shutdown()

    def execute(self, run: Run, session: None) -> None:
        run.summary.model_seconds = 0.0  # summed over the actors, as are their waits
        run.summary.model_input_wait_seconds = run.summary.model_output_wait_seconds = 0.0
        import ray

        task = ray.remote(num_cpus=run.cfg.engine.cpus_per_task)(compact)
        compactor = Compactor(run, lambda names, tag: task.remote(run.plan, run.sink.staging, names, tag).future())
        for reports in build_dataset(run).iter_batches(batch_format="pyarrow", batch_size=None):
            for report in reports.to_pylist():
                run.summary.add_model_waits(report)
                compactor.add(report)
        compactor.finish()
