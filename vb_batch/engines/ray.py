"""The Ray engine: the same stages as Ray Data operators, the model in an actor pool.

    units    [driver]     Source.units(): row groups of the input files, or slices of an image listing
    prepare  [CPU tasks]  read_unit, ids, resume filter, fetch_decode     engine.cpu_batch_rows, cpus_per_task
    model    [actors]     run_model, one backend per actor                model.batch_size, engine.actors,
                                                                          gpus_per_actor, cpus_per_actor
    finish   [CPU tasks]  decode_encode, write one staged part file       engine.cpu_batch_rows, cpus_per_task
    commit   [driver]     the output's sink (open_sink): stage, commit, modes, resume, _SUCCESS

Reading: the prepare tasks read the units with `read_unit` (an explicit
pyarrow filesystem from `input.storage`), as the Spark engine does, rather than
with `ray.data.read_parquet`: the units carry what the source knows and Ray's
reader does not (`input.filter` pruning, partition values of lake tables), so
every engine reads exactly the same rows.

Writing: every finish task writes its rows as one Parquet file into the sink's
staging directory, with the sink's schema, and returns one small manifest row
(file, rows, error codes, model nodes). The driver hands each reported file to
the sink's `stage`, which commits it exactly as it commits its own files
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

import json
import logging
import os
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vb_batch.config import ConfigError, EngineConfig, JobConfig, redacted
from vb_batch.io.filesystems import split_scheme
from vb_batch.io.sinks import ParquetSink, open_sink, write_part
from vb_batch.io.sources import Source, open_source, read_unit, with_ids
from vb_batch.job import RunSummary, tracked_run
from vb_batch.models.base import BACKENDS, create_backend
from vb_batch.stages import ERROR_COLUMN, Plan, check_backend, decode_encode, fetch_decode, run_model

log = logging.getLogger(__name__)

NODE_COLUMN = "_vb_model_node"
MODEL_SECONDS_COLUMN = "_vb_model_seconds"  # the batch's time in the model actor, spread evenly over its rows
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("error_codes", pa.list_(pa.string())),
        pa.field("model_nodes", pa.list_(pa.struct([pa.field("node", pa.string()), pa.field("rows", pa.int64())]))),
        pa.field("model_seconds", pa.float64()),
    ]
)
# Process-local storage: Ray workers would each see their own, empty one.
PROCESS_LOCAL_SCHEMES = ("memory",)


def record_batch(table: pa.Table) -> pa.RecordBatch:
    """Ray hands `batch_format="pyarrow"` batches over as tables; the stages take one record batch."""
    batches = table.combine_chunks().to_batches()  # one chunk per column: one batch, or none if empty
    if batches:
        return batches[0]
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in table.schema], schema=table.schema)


# ---------------------------------------------------------------------------- the three operators


def prepare(units: pa.Table, plan: Plan, source_schema: pa.Schema, done: pa.Array | None) -> Iterator[pa.Table]:
    """CPU task: read units, give rows their ids, drop the ids already committed (resume), fetch and decode images."""
    cfg = plan.cfg
    for unit in units.column("unit").to_pylist():
        for batch in read_unit(json.loads(unit), cfg.input, source_schema, cfg.engine.cpu_batch_rows):
            batch = with_ids(batch, cfg.input.id_column, plan.image_column, plan.uri_column)
            if done is not None:
                ids = batch.column(batch.schema.get_field_index(cfg.input.id_column))
                batch = batch.filter(pc.invert(pc.is_in(ids, value_set=done)))
            if batch.num_rows:
                yield pa.Table.from_batches([fetch_decode(batch, plan)])


class ModelActor:
    """One per actor in the pool: builds the backend once, then runs `run_model` on each batch.

    It records the node it runs on in every row (dropped by `finish`), so the run
    record can say where the model ran.
    """

    def __init__(self, plan: Plan, backends: dict[str, str]):
        import ray

        BACKENDS.update(backends)  # backends the driver registered at run time
        self.plan = plan
        self.backend = create_backend(plan.cfg.model)
        check_backend(plan, self.backend)
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        batch = run_model(record_batch(table), self.plan, self.backend)
        seconds = (time.perf_counter() - started) / max(1, batch.num_rows)
        batch = batch.append_column(NODE_COLUMN, pa.array([self.node_id] * batch.num_rows, pa.string()))
        batch = batch.append_column(MODEL_SECONDS_COLUMN, pa.array([seconds] * batch.num_rows, pa.float64()))
        return pa.Table.from_batches([batch])


def finish(table: pa.Table, plan: Plan, staging: str) -> pa.Table:
    """CPU task: decode and encode the answers, write them as one staged part file, return its manifest row."""
    batch = record_batch(table)
    if batch.num_rows == 0:
        return MANIFEST_SCHEMA.empty_table()
    nodes = Counter(batch.column(batch.schema.get_field_index(NODE_COLUMN)).to_pylist())
    model_seconds = pc.sum(batch.column(batch.schema.get_field_index(MODEL_SECONDS_COLUMN))).as_py()
    out = decode_encode(batch, plan)
    name = f"part-{plan.run_id}-{uuid.uuid4().hex[:16]}.parquet"
    write_part(plan.cfg.output, posixpath.join(staging, name), pa.Table.from_batches([out]))
    codes = [e["code"] for e in out.column(ERROR_COLUMN).to_pylist() if e is not None]
    return pa.Table.from_pylist(
        [{"file": name, "rows": out.num_rows, "error_codes": codes,
          "model_nodes": [{"node": node, "rows": rows} for node, rows in sorted(nodes.items())],
          "model_seconds": model_seconds}],
        schema=MANIFEST_SCHEMA,
    )


# ---------------------------------------------------------------------------- wiring


def check_reachable(cfg: JobConfig) -> None:
    for key, url in (("input.path", cfg.input.path), ("output.path", cfg.output.path)):
        if split_scheme(url)[0] in PROCESS_LOCAL_SCHEMES:
            raise ConfigError(f"{key}: {url!r} lives in one process; the ray engine needs storage every worker reaches")


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

    units = [{"unit": json.dumps(unit)} for unit in source.units(cfg.engine.cpu_batch_rows)]
    return ray.data.from_items(units, override_num_blocks=max(1, len(units)))


def build_dataset(cfg: JobConfig, plan: Plan, source: Source, done: pa.Array | None, staging: str):
    """units -> prepare (CPU tasks) -> model (actor pool) -> finish (CPU tasks): a dataset of manifest rows."""
    engine = cfg.engine
    ds = read_units(cfg, source).map_batches(
        prepare,
        batch_format="pyarrow",
        batch_size=1,
        fn_kwargs={"plan": plan, "source_schema": source.dataset.schema, "done": done},
        num_cpus=engine.cpus_per_task,
    )
    ds = ds.map_batches(
        ModelActor,
        batch_format="pyarrow",
        batch_size=cfg.model.batch_size,
        fn_constructor_kwargs={"plan": plan, "backends": dict(BACKENDS)},
        compute=actor_pool(engine),
        num_gpus=engine.gpus_per_actor,
        num_cpus=engine.cpus_per_actor,
    )
    return ds.map_batches(
        finish,
        batch_format="pyarrow",
        batch_size=min(engine.cpu_batch_rows, cfg.output.rows_per_file),
        fn_kwargs={"plan": plan, "staging": staging},
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


def done_ids(done: set, source: Source) -> pa.Array | None:
    if not done:
        return None
    return pa.array(list(done), type=source.schema.field(source.id_column).type)


def run_ray(cfg: JobConfig, backend=None) -> RunSummary:
    if backend is not None:
        raise ValueError(
            "engine.kind: the ray engine builds one backend per actor from model.*; a backend instance "
            "works only with the local engine; name your own as model.backend: package.module:Class"
        )
    started = time.perf_counter()
    check_reachable(cfg)
    source = open_source(cfg.input)
    plan = Plan.build(cfg, source.schema, image_column=source.image_column, uri_column=source.uri_column)
    sink = open_sink(cfg.output, plan.run_id, plan.output_schema(), source.id_column)
    summary = RunSummary(run_id=plan.run_id, output=cfg.output.name, engine="ray")
    sink.check_mode()  # fail fast, before a cluster is joined
    owns_connection = connect(cfg.engine)
    try:
        return _run(cfg, plan, source, sink, summary, started)
    finally:
        if owns_connection:
            import ray

            ray.shutdown()


def _run(cfg: JobConfig, plan: Plan, source: Source, sink: ParquetSink, summary: RunSummary, started: float) -> RunSummary:
    from ray.data import DataContext

    done = sink.open()
    log.info("run %s: %s", plan.run_id, redacted(cfg))
    summary.rows_read = source.count_rows()
    model_nodes: Counter[str] = Counter()
    summary.model_seconds = 0.0  # summed over the actors
    context = DataContext.get_current()
    ray_bars, context.enable_progress_bars = context.enable_progress_bars, False  # ours counts committed rows
    try:
        with tracked_run(cfg, sink, summary, started, summary.rows_read, lambda: {"model_nodes": dict(model_nodes)}) as advance:
            dataset = build_dataset(cfg, plan, source, done_ids(done, source), sink.staging)
            for manifest in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in manifest.to_pylist():
                    sink.stage(row["file"], row["rows"])
                    summary.count_errors(row["error_codes"] + [None] * (row["rows"] - len(row["error_codes"])))
                    model_nodes.update({n["node"]: n["rows"] for n in row["model_nodes"]})
                    summary.model_seconds += row["model_seconds"]
                    advance(row["rows"])
            # Every row read was either processed or, committed already, dropped before the model.
            summary.rows_skipped = summary.rows_read - summary.rows_processed
    finally:
        context.enable_progress_bars = ray_bars
    return summary
