"""The Ray engine: the same stages as Ray Data operators, the model in an actor pool.

    units    [driver]     Source.units(): row groups of the input files, or slices of an image listing
    prepare  [CPU tasks]  read_unit, ids, resume filter, fetch_decode     engine.cpu_batch_rows, cpus_per_task
    model    [actors]     run_model, one backend per actor                model.batch_size, engine.actors,
                                                                          gpus_per_actor, cpus_per_actor
    finish   [CPU tasks]  decode_encode, write one staged part file       engine.cpu_batch_rows, cpus_per_task
    commit   [driver]     the run core (vb_batch.engines.base): stage, commit, modes, resume, _SUCCESS

Reading: the prepare tasks read the units with `read_unit` (an explicit
pyarrow filesystem from `input.storage`), as the Spark engine does, rather than
with `ray.data.read_parquet`: the units carry what the source knows and Ray's
reader does not (`input.filter` pruning, partition values of lake tables), so
every engine reads exactly the same rows.

Writing: every finish task writes its rows as part files into the sink's
staging directory, with the sink's schema, and returns their part reports
(`PART_SCHEMA`: file, rows, error codes, model seconds and nodes). The driver
hands each report to `run.apply`, which stages the file; the sink commits it
exactly as it commits its own files
(every `output.commit_every` rows, and at the end; a Parquet dataset, or a
Delta / Iceberg table through its log). So output bytes never pass
through the driver, and a file no task reported (a retried or killed task) is
never committed and goes away with the staging directory: rows are neither
lost nor duplicated. Part files hold at most `min(engine.cpu_batch_rows,
output.rows_per_file)` rows, which keeps a finish task's memory small.

`output.mode: resume` drops the committed ids in the prepare tasks, before the
model sees them. The driver needs no GPU and never loads the model. The run
record (`_vb/runs/<run_id>.json`) says on which nodes the model ran:
`model_nodes: {node id: rows}`.

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
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from vb_batch.config import ConfigError, EngineConfig, JobConfig
from vb_batch.engines.base import PART_SCHEMA, Engine, ResumeFilter, Run, cached_backend, stage_parts
from vb_batch.io.filesystems import split_scheme
from vb_batch.io.sources import Source, read_unit, with_ids
from vb_batch.stages import Plan, decode_encode, fetch_decode, run_model

log = logging.getLogger(__name__)

NODE_COLUMN = "_vb_model_node"
MODEL_SECONDS_COLUMN = "_vb_model_seconds"  # the batch's time in the model actor, spread evenly over its rows
# Process-local storage: Ray workers would each see their own, empty one.
PROCESS_LOCAL_SCHEMES = ("memory",)


def record_batch(table: pa.Table) -> pa.RecordBatch:
    """Ray hands `batch_format="pyarrow"` batches over as tables; the stages take one record batch."""
    batches = table.combine_chunks().to_batches()  # one chunk per column: one batch, or none if empty
    if batches:
        return batches[0]
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in table.schema], schema=table.schema)


# ---------------------------------------------------------------------------- the three operators


def prepare(units: pa.Table, plan: Plan, source_schema: pa.Schema, resume: ResumeFilter) -> Iterator[pa.Table]:
    """CPU task: read units, give rows their ids, drop the ids already committed (resume), fetch and decode images."""
    cfg = plan.cfg
    for unit in units.column("unit").to_pylist():
        for batch in read_unit(json.loads(unit), cfg.input, source_schema, cfg.engine.cpu_batch_rows):
            batch, _ = resume.apply(with_ids(batch, cfg.input.id_column, plan.image_column, plan.uri_column))
            if batch.num_rows:
                yield pa.Table.from_batches([fetch_decode(batch, plan)])


class ModelActor:
    """One per actor in the pool: builds the backend once, then runs `run_model` on each batch.

    It records the node it runs on in every row (dropped by `finish`), so the run
    record can say where the model ran.
    """

    def __init__(self, plan: Plan):
        import ray

        self.plan = plan
        self.backend = cached_backend(plan)
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        batch = run_model(record_batch(table), self.plan, self.backend)
        seconds = (time.perf_counter() - started) / max(1, batch.num_rows)
        batch = batch.append_column(NODE_COLUMN, pa.array([self.node_id] * batch.num_rows, pa.string()))
        batch = batch.append_column(MODEL_SECONDS_COLUMN, pa.array([seconds] * batch.num_rows, pa.float64()))
        return pa.Table.from_batches([batch])


def finish(table: pa.Table, plan: Plan, staging: str) -> pa.Table:
    """CPU task: decode and encode the answers, write them as staged part files, return their part reports."""
    batch = record_batch(table)
    if batch.num_rows == 0:
        return PART_SCHEMA.empty_table()
    nodes = Counter(batch.column(batch.schema.get_field_index(NODE_COLUMN)).to_pylist())
    model_seconds = sum(batch.column(batch.schema.get_field_index(MODEL_SECONDS_COLUMN)).to_pylist())
    out = pa.Table.from_batches([decode_encode(batch, plan)])
    reports = stage_parts(plan, staging, out, uuid.uuid4().hex[:16], model_seconds, dict(nodes))
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
        batch_size=cfg.model.batch_size,
        fn_constructor_kwargs={"plan": plan},
        compute=actor_pool(engine),
        num_gpus=engine.gpus_per_actor,
        num_cpus=engine.cpus_per_actor,
    )
    return ds.map_batches(
        finish,
        batch_format="pyarrow",
        batch_size=min(engine.cpu_batch_rows, cfg.output.rows_per_file),
        fn_kwargs={"plan": plan, "staging": run.sink.staging},
        num_cpus=engine.cpus_per_task,
    )


def connect(engine: EngineConfig) -> bool:
    """Join `engine.address` (or RAY_ADDRESS, or a new local Ray); True when this call started the connection."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"address": engine.address}
    if engine.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    return True


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
        ray_bars, context.enable_progress_bars = context.enable_progress_bars, False  # ours counts committed rows
        try:
            yield None
        finally:
            context.enable_progress_bars = ray_bars
            if owns_connection:
                ray.shutdown()

    def execute(self, run: Run, session: None) -> None:
        run.summary.model_seconds = 0.0  # summed over the actors
        for reports in build_dataset(run).iter_batches(batch_format="pyarrow", batch_size=None):
            for report in reports.to_pylist():
                run.apply(report)
