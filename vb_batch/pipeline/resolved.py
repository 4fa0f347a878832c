"""A job resolved once before any row is touched: `ResolvedJob` (formerly `Plan`), run ids, row seeds.

`ResolvedJob.build(cfg, input_schema)` resolves what every stage needs from the
config and the input's schema: the tasks and their codec context (legend,
depth preset, normals frame, prompt templates), which tasks the backend answers
natively, the model id and profile for provenance, the run id, and the output
schema (input columns kept, output columns with their field metadata). It
refuses here, on the driver, what cannot run (an unknown profile, a bad legend,
output columns that clash with input ones). Runs and workers share it as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from vb_batch._version import __version__
from vb_batch.config import ConfigError, JobConfig, redacted
from vb_batch.errors import ERROR_COLUMN, ERROR_TYPE
from vb_batch.io.encodings import storage_type
from vb_batch.models.base import backend_class, model_id
from vb_batch.models.profiles import get_profile
from vb_batch.pipeline.columns import (
    HOSTED_STATE_DIR,
    PROVENANCE_COLUMNS,
    USAGE_OUTPUT_COLUMN,
    USAGE_TYPE,
)
from vb_batch.pipeline.grid import grid_metadata, image_size_columns
from vb_batch.registry import added_entries, replay
from vb_batch.tasks import Task, TaskContext, build_legend, get_task

__all__ = ["Plan", "ResolvedJob", "new_run_id", "row_seed"]


def new_run_id() -> str:
    """Sortable by start time, unique across machines."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def row_seed(seed: int, row_id: Any) -> int:
    """Per-row sampling seed from the job seed and the row id: the same labels whatever the batching."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class ResolvedJob:
    """A job config resolved once for rows of one schema: tasks, codec context, output schema, provenance.

    Cheap to ship to workers; every stage takes one. (Called `Plan` before; the alias stays.)
    """

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
    # Where the run's one rate limiter lives for a hosted model's limits on Ray or Spark (set by the
    # engine's session, `vb_batch.models.quota_share`); None: each process paces itself. Never shown:
    # a Spark driver's address carries the token server's token.
    rate_limiter: str | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls, cfg: JobConfig, input_schema: pa.Schema, image_column=None, uri_column=None, run_id: str | None = None
    ) -> "ResolvedJob":
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
        replay(self.registrations)  # in a worker, a backend registered at run time on the driver
        backend = backend_class(self.cfg.model.backend)
        fitted = backend.answer_metadata(self.cfg.model)  # hosted models: how images were fitted to the model
        for task in self.tasks:
            meta = {**task.column_meta(self.ctx, encoding).to_metadata(), **grid, **fitted}
            fields.append(pa.field(self.column(task), storage_type(encoding), metadata=meta))
            fields.append(pa.field(self.column(task, "_confidence"), pa.float32()))
            fields += [pa.field(self.column(task, s), t) for s, t in task.summary_fields(self.ctx)]
        if grid:
            fields += [pa.field(name, pa.int32()) for name in image_size_columns(self.cfg.output)]
        fields.append(pa.field(ERROR_COLUMN, ERROR_TYPE))
        fields += [pa.field(name, pa.string()) for name in PROVENANCE_COLUMNS]
        if backend.reports_usage(self.cfg.model):
            fields.append(pa.field(USAGE_OUTPUT_COLUMN, USAGE_TYPE, metadata={
                "unit": "tokens; cost in US$", "description": "what the service billed for the row (all tasks)"}))
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


# The name it had: a plan it is not (nothing is planned), but old code imports it.
Plan = ResolvedJob
