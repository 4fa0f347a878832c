"""Plan a job before running it: every config mistake at once, the checks a run would fail, an estimate.

`plan(config)` (and `vb-batch plan CONFIG`) works in three steps, each optional
after the first:

1. **Static** (no I/O): the config validated with every problem listed (not the
   first), the backend, profile and legend resolved, and the output schema the
   job would write for an input of just its id and image columns.
2. **Live** (reads, never writes): the input opens, its row count, the ids are
   unique, the output is not the input, the output mode fits what exists at the
   output (`mode: error` over existing rows), the model's weights are at hand,
   the device is usable. Each check runs on its own, so one failure hides no other.
3. **Sample** (`sample=N`): the job run for real on the first N input rows into
   a temporary output (after a short warm-up run on a few of them), on this
   machine with the local engine; the measured
   seconds per image and output bytes per row are projected to the whole input,
   here and on `workers` such machines.

The projection assumes what the sample saw: rows like the first N, and a
cluster whose workers each run as fast as this machine, fed as well. The
fixed cost (start, model load, commit, report) is paid once per run.

`config_reference()` lists every config key with its type, default and meaning
(from the pydantic models' field descriptions): `docs/config.md` and
`vb-batch run --help` are rendered from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vb_batch.config import ConfigError, JobConfig, load_config
from vb_batch.errors import OutputExistsError
from vb_batch.masking import mask_text, mask_url, secret_values

# ---------------------------------------------------------------------------- what a plan says


@dataclass
class Check:
    """One live check: its name, "ok" / "warning" / "error", and what it found."""

    name: str
    status: str
    detail: str
    fix_config: bool = False  # an error that a change of the config (or of the input it names) fixes


@dataclass
class Estimate:
    """A sample run's measurements and their projection to the whole input."""

    sample_rows: int
    sample_seconds: float
    fixed_seconds: float  # start, model load, closing and report: once per run
    seconds_per_image: float  # the processing loop's seconds per row
    bytes_per_row: float  # output part files' bytes per row
    rows: int | None  # the whole input (None: unknown)
    workers: int = 1
    rows_failed: int = 0
    model_calls: int | None = None  # the sample's model calls (one per task, pass and group of rows)
    model_images: int | None = None  # the images those calls answered

    @property
    def seconds_here(self) -> float | None:
        return None if self.rows is None else self.fixed_seconds + self.seconds_per_image * self.rows

    @property
    def seconds_on_cluster(self) -> float | None:
        if self.rows is None:
            return None
        return self.fixed_seconds + self.seconds_per_image * self.rows / max(self.workers, 1)

    @property
    def output_bytes(self) -> float | None:
        return None if self.rows is None else self.bytes_per_row * self.rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "sample_rows": self.sample_rows, "sample_seconds": round(self.sample_seconds, 3),
            "fixed_seconds": round(self.fixed_seconds, 3), "seconds_per_image": round(self.seconds_per_image, 5),
            "bytes_per_row": round(self.bytes_per_row, 1), "rows": self.rows, "workers": self.workers,
            "seconds_here": _round(self.seconds_here), "seconds_on_cluster": _round(self.seconds_on_cluster),
            "output_bytes": _round(self.output_bytes), "rows_failed": self.rows_failed,
            "model_calls": self.model_calls, "model_images": self.model_images,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class JobPlan:
    """What `plan` found: static problems, live checks, the output schema, an estimate."""

    problems: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    schema: pa.Schema | None = None
    schema_is_static: bool = True  # built for an input of only its id and image columns
    estimate: Estimate | None = None
    config: JobConfig | None = None

    @property
    def ok(self) -> bool:
        """No config problem and no live check in error (warnings are fine)."""
        return not self.problems and all(c.status != "error" for c in self.checks)

    @property
    def exit_code(self) -> int:
        """As `vb-batch run`'s: 0 ok, 2 the config must change, 1 anything else failed (storage, ...)."""
        if self.problems or any(c.status == "error" and c.fix_config for c in self.checks):
            return 2
        return 0 if self.ok else 1

    def errors(self) -> list[str]:
        """Each problem and failed check as one line (for stderr)."""
        return self.problems + [f"{c.name}: {c.detail}" for c in self.checks if c.status == "error"]

    def render(self) -> str:
        """The plan as text for people (secrets masked by the checks themselves)."""
        if self.problems:
            lines = [f"invalid job config ({len(self.problems)} problem(s)):"]
            return "\n".join(lines + [f"  {p}" for p in self.problems])
        lines = ["config: valid"]
        if self.checks:
            lines.append("checks:")
            width = max(len(c.name) for c in self.checks)
            lines += [f"  {c.status:7} {c.name:{width}}  {c.detail}" for c in self.checks]
        if self.schema is not None:
            note = " (plus the input's other columns)" if self.schema_is_static else ""
            lines.append(f"output columns{note}:")
            lines += [f"  {line}" for line in schema_lines(self.schema)]
        if self.estimate is not None:
            lines += estimate_lines(self.estimate)
        return "\n".join(lines)


def schema_lines(schema: pa.Schema) -> list[str]:
    """One line per column: name, Arrow type, and its unit / kind when vb_batch wrote one."""
    width = max((len(f.name) for f in schema), default=0)
    lines = []
    for f in schema:
        meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items() if k.startswith(b"vb.")}
        meaning = ", ".join(f"{k[3:]}={meta[k]}" for k in ("vb.kind", "vb.unit", "vb.encoding", "vb.frame") if k in meta)
        lines.append(f"{f.name:{width}}  {f.type}" + (f"  [{meaning}]" if meaning else ""))
    return lines


def estimate_lines(est: Estimate) -> list[str]:
    failed = f", {est.rows_failed} failed" if est.rows_failed else ""
    lines = [(
        f"sample: {est.sample_rows} rows{failed} in {est.sample_seconds:.1f} s on this machine: "
        f"{est.seconds_per_image * 1000:.1f} ms per image, {est.fixed_seconds:.1f} s fixed "
        f"(start, model load, commit, report), {_size(est.bytes_per_row)} per row"
    )]
    if est.model_calls:
        lines.append(
            f"model: {est.model_calls} calls of {est.model_images / est.model_calls:.1f} images on average "
            "(model.batch_size, model.group_window)"
        )
    if est.rows is None:
        return lines + ["whole input: row count unknown; no projection"]
    lines.append(
        f"whole input ({est.rows:,} rows): about {_duration(est.seconds_here)} here, "
        f"{_size(est.output_bytes)} of output"
    )
    if est.workers > 1:
        lines.append(
            f"on {est.workers} workers like this machine: about {_duration(est.seconds_on_cluster)} "
            "(assumes linear scaling and inputs fed as fast as here)"
        )
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------- static


def read_config(source: str | Path | dict[str, Any] | JobConfig, overrides: list[str] | None = None
                ) -> tuple[JobConfig | None, list[str]]:
    """(the config, []) when it is valid, else (None, every problem): no I/O beyond reading the YAML file."""
    if isinstance(source, JobConfig):
        return source, []
    try:
        return load_config(source, overrides), []
    except ConfigError as exc:
        # load_config lists every problem, a line each, under one heading (see config.config_problems).
        head, _, rest = str(exc).partition("\n")
        if head == "invalid job config:" and rest:
            return None, [line.strip() for line in rest.splitlines()]
        return None, [str(exc)]


def static_schema(cfg: JobConfig, input_schema: pa.Schema | None = None) -> pa.Schema:
    """The output schema for `input_schema` (None: an input of only the id and image / URI columns).

    Resolves the backend, profile, codec presets and legend: their faults are `ConfigError`s here.
    """
    from vb_batch.stages import Plan

    image_column = cfg.input.image_column or (None if cfg.input.uri_column else "image")
    if input_schema is None:
        fields = [pa.field(cfg.input.id_column, pa.string())]
        fields.append(pa.field(cfg.input.uri_column, pa.string()) if cfg.input.uri_column
                      else pa.field(image_column, pa.binary()))
        input_schema = pa.schema(fields)
    return Plan.build(cfg, input_schema, image_column, cfg.input.uri_column).output_schema()


def validate(config: str | Path | dict[str, Any] | JobConfig, overrides: list[str] | None = None) -> JobConfig:
    """The validated config, with no I/O; a `ConfigError` listing every problem otherwise.

    Resolves what a run resolves first (backend, profile, codec presets, legend), so
    their mistakes show here too. The Python twin of `vb-batch validate CONFIG`.

    >>> import vb_batch
    >>> cfg = vb_batch.validate({"input": {"path": "in.parquet"}, "model": {"backend": "identity"}})
    >>> cfg.model.batch_size
    8
    >>> vb_batch.validate({"input": {"path": "in.parquet"}, "model": {"batch_size": 0}})
    Traceback (most recent call last):
    ...
    vb_batch.errors.ConfigError: invalid job config:
      model.batch_size: Input should be greater than 0
      model.backend: required, e.g. marigold (with model.path), diffusers, http, demo, or identity to decode the input images themselves as paintings (codec debugging)
    """
    cfg, problems = read_config(config, overrides)
    if cfg is None:
        raise ConfigError("invalid job config:\n" + "\n".join(f"  {p}" for p in problems))
    try:
        static_schema(cfg)
    except ConfigError as exc:
        raise ConfigError(mask_text(str(exc), secret_values(cfg.model_dump(mode="json")))) from None
    return cfg


# ---------------------------------------------------------------------------- live


def live_checks(cfg: JobConfig) -> tuple[list[Check], Any, int | None]:
    """Read-only checks of what a run needs: (checks, the opened source or None, the row count or None)."""
    from vb_batch.engines.base import check_ids, check_paths
    from vb_batch.io.sources import open_source

    secrets = secret_values(cfg.model_dump(mode="json"))
    checks: list[Check] = []

    def attempt(name: str, fn, ok_detail=lambda value: "ok", field_name: str = ""):
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - each check reports its own fault; the others still run
            text = str(exc) if isinstance(exc, (ConfigError, OutputExistsError)) else f"{type(exc).__name__}: {exc}"
            if field_name and not isinstance(exc, ConfigError):  # a storage fault: which key to look at
                text = f"{field_name}: cannot read {shown!r}: {text}"
            checks.append(Check(name, "error", mask_text(text, secrets), isinstance(exc, ConfigError)))
            return None
        checks.append(Check(name, "ok", mask_text(ok_detail(value), secrets)))
        return value

    shown = mask_url(cfg.input.path or cfg.input.table or "")
    source = attempt("input readable", lambda: open_source(cfg.input),
                     lambda s: f"{shown} ({len(s.schema)} columns; image column {s.image_column or s.uri_column!r})",
                     "input.table" if cfg.input.format == "iceberg" else "input.path")
    rows = None
    if source is not None:
        rows = attempt("input rows", source.count_rows, lambda n: f"{n:,} rows" + (" (after input.filter)" if cfg.input.filter else ""))
        attempt("ids unique", lambda: check_ids(source),
                lambda ids: "no id column: ids are content hashes, computed as rows are read" if ids is None
                else f"{len(ids):,} distinct {source.id_column!r} values")
        attempt("output is not the input", lambda: check_paths(cfg, source))
        attempt("output mode", lambda: _check_output(cfg, source), lambda text: text)
    for check in model_checks(cfg):
        checks.append(Check(check.name, check.status, mask_text(check.detail, secrets)))
    return checks, source, rows


def _check_output(cfg: JobConfig, source) -> str:
    """The sink's own read-only check: what a run would refuse (an existing output with mode: error, ...)."""
    from vb_batch.io.formats import open_sink
    from vb_batch.io.sinks import schema_fingerprint
    from vb_batch.stages import Plan

    plan = Plan.build(cfg, source.schema, image_column=source.image_column, uri_column=source.uri_column)
    schema = plan.output_schema()
    sink = open_sink(cfg.output, plan.run_id, schema, source.id_column,
                     fingerprint=schema_fingerprint(schema, plan.model, plan.profile), retry_failed=cfg.run.retry_failed)
    sink.check()
    return f"output.mode {cfg.output.mode} fits {mask_url(cfg.output.name)}"


def model_checks(cfg: JobConfig) -> list[Check]:
    """Weights present and the device usable, as far as this process can tell without loading the model."""
    checks = []
    paths = cfg.model.path if isinstance(cfg.model.path, dict) else {"": cfg.model.path} if cfg.model.path else {}
    sources = [(f"model.path{'.' + task if task else ''}", path) for task, path in paths.items()]
    if cfg.model.transformer_path:
        sources.append(("model.transformer_path", cfg.model.transformer_path))
    for field_name, source in sources:
        checks.append(_weights_check(field_name, source, cfg.model.revision))
    if cfg.model.backend == "http" and cfg.model.token_env and not os.environ.get(cfg.model.token_env):
        checks.append(Check("model token", "error", f"model.token_env: the environment variable {cfg.model.token_env!r} "
                                                   "is not set or empty here", True))
    if cfg.engine.kind != "local":
        checks.append(Check("device", "ok", f"model.device {cfg.model.device}: checked on the {cfg.engine.kind} "
                                            "workers where the model loads"))
    elif cfg.model.backend in ("marigold", "diffusers", "demo"):
        from vb_batch.models.loading import resolve_device

        try:
            checks.append(Check("device", "ok", f"model.device {cfg.model.device} -> {resolve_device(cfg.model.device)}"))
        except ConfigError as exc:
            checks.append(Check("device", "error", str(exc), True))
    return checks


def _weights_check(field_name: str, source: str, revision: str | None) -> Check:
    from vb_batch.models.loading import hub_offline

    name = f"weights {field_name}"
    if os.path.isdir(source):
        found = any((Path(source) / f).exists() for f in ("model_index.json", "config.json"))
        return Check(name, "ok" if found else "error", f"{source}" + ("" if found else
                     ": a directory without model_index.json or config.json: not a saved pipeline or model"), not found)
    if os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1:
        return Check(name, "error", f"{field_name}: checkpoint directory {source!r} does not exist", True)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(source, f, revision=revision), str)
                     for f in ("model_index.json", "config.json"))
    except Exception:  # noqa: BLE001 - no hub client or a malformed id: say what is known
        cached = False
    if cached:
        return Check(name, "ok", f"{source} (in the local Hugging Face cache)")
    if hub_offline():
        return Check(name, "error", f"{field_name}: {source!r} is not in the local Hugging Face cache and "
                                    "HF_HUB_OFFLINE is set: download it first or give a local directory", True)
    return Check(name, "warning", f"{source} is not in the local Hugging Face cache: the run downloads it "
                                  "(needs hub access)")


# ---------------------------------------------------------------------------- sample


def measure(cfg: JobConfig, source, sample: int, rows: int | None, workers: int = 1) -> Estimate:
    """Run the job on the first `sample` rows of `source` into a temporary output (local engine); the estimate."""
    import pyarrow.parquet as pq

    from vb_batch.io.fetch import _input_scheme
    from vb_batch.job import run_job

    with tempfile.TemporaryDirectory(prefix="vb-plan-") as tmp:
        taken, batches = 0, []
        for batch in source.batches(min(sample, cfg.input.read_batch_rows)):
            batches.append(batch.slice(0, sample - taken))
            taken += batches[-1].num_rows
            if taken >= sample:
                break
        if not taken:
            raise ConfigError("input: no rows to sample (empty input, or input.filter matches none)")
        table = pa.Table.from_batches(batches).replace_schema_metadata(None)
        pq.write_table(table, os.path.join(tmp, "sample.parquet"))
        # A first short run pays for what a process does once (imports, thread pools, kernels):
        # in the measured run, the per-image time is that of a run under way.
        warm_rows = min(table.num_rows, 2 * cfg.model.batch_size)
        pq.write_table(table.slice(0, warm_rows), os.path.join(tmp, "warm.parquet"))
        data = cfg.model_dump(mode="python")
        data["input"] = {
            **{k: data["input"][k] for k in ("max_pixels", "max_bytes", "image_formats", "min_side",
                                               "allow_private_addresses", "storage", "read_batch_rows")},
            "path": os.path.join(tmp, "sample.parquet"), "format": "parquet", "id_column": source.id_column,
            "image_column": source.image_column, "uri_column": source.uri_column,
            # URIs keep the rules of the real input (the sample table itself is a local file).
            "allowed_prefixes": cfg.input.allowed_prefixes
            if cfg.input.allowed_prefixes is not None or not source.uri_column
            else [f"{_input_scheme(cfg.input.path)}://"],
        }
        data["output"] = {**data["output"], "path": os.path.join(tmp, "out"), "format": "parquet", "mode": "overwrite",
                          "table": None, "catalog": {}, "partition_by": [], "commit_every": 0}
        data["engine"] = {"kind": "local", "io_threads": cfg.engine.io_threads,
                          "prefetch_batches": cfg.engine.prefetch_batches}
        data["run"] = {**data["run"], "progress": False, "max_error_fraction": 1.0, "retry_failed": False}
        warm = {**data, "input": {**data["input"], "path": os.path.join(tmp, "warm.parquet")},
                "output": {**data["output"], "path": os.path.join(tmp, "warm"), "report": False}}
        run_job(JobConfig.model_validate(warm))
        started = time.perf_counter()
        summary = run_job(JobConfig.model_validate(data))
        seconds = time.perf_counter() - started
        out = Path(tmp) / "out"
        written = sum(p.stat().st_size for p in out.glob("*.parquet"))
    done = max(summary.rows_processed, 1)
    processing = summary.wall_seconds.get("processing", seconds)
    return Estimate(
        sample_rows=summary.rows_processed, sample_seconds=seconds, fixed_seconds=max(seconds - processing, 0.0),
        seconds_per_image=processing / done, bytes_per_row=written / done, rows=rows, workers=workers,
        rows_failed=summary.rows_failed, model_calls=summary.model_calls, model_images=summary.model_images,
    )


# ---------------------------------------------------------------------------- the plan


def plan(config: str | Path | dict[str, Any] | JobConfig, overrides: list[str] | None = None, *, live: bool = True,
         sample: int = 0, workers: int = 1) -> JobPlan:
    """Check a job without running it, and with `sample=N` estimate its time and size; the Python `vb-batch plan`.

    Static checks first (every problem at once), then, with `live=True`, read-only
    checks of the input, output and model; with `sample=N`, a measured run on N rows
    projected to the whole input (here and on `workers` machines like this one).

    >>> import vb_batch
    >>> p = vb_batch.plan({"input": {"path": "in.parquet"}, "model": {"backend": "identity"},
    ...                    "tasks": ["depth", "segmentation"], "output": {"mode": "replace"}}, live=False)
    >>> p.ok
    False
    >>> print(p.render())
    invalid job config (2 problem(s)):
      output.mode: Input should be 'error', 'overwrite', 'append' or 'resume'
      task 'segmentation' needs segmentation.classes or segmentation.legend
    >>> p = vb_batch.plan({"input": {"path": "in.parquet"}, "model": {"backend": "identity"}}, live=False)
    >>> p.ok, [f.name for f in p.schema][:4]
    (True, ['id', 'image', 'depth', 'depth_confidence'])
    """
    cfg, problems = read_config(config, overrides)
    result = JobPlan(problems=problems, config=cfg)
    if cfg is None:
        return result
    try:
        result.schema = static_schema(cfg)
    except ConfigError as exc:
        result.problems.append(mask_text(str(exc), secret_values(cfg.model_dump(mode="json"))))
        return result
    if not live:
        return result
    result.checks, source, rows = live_checks(cfg)
    if source is not None and all(c.status != "error" for c in result.checks if c.name == "output mode"):
        try:
            result.schema = static_schema(cfg, source.schema)
            result.schema_is_static = False
        except ConfigError as exc:
            result.checks.append(Check("output schema", "error", str(exc), True))
    if sample > 0 and result.ok and source is not None:
        try:
            result.estimate = measure(cfg, source, sample, rows, workers)
        except Exception as exc:  # noqa: BLE001 - the sample run's fault is the plan's finding, not a crash
            detail = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            result.checks.append(Check("sample run", "error", mask_text(detail, secret_values(cfg.model_dump(mode="json"))),
                                       isinstance(exc, ConfigError)))
    return result


# ---------------------------------------------------------------------------- the config reference


@dataclass
class ConfigKey:
    key: str  # dotted, e.g. output.mode
    type: str
    default: str
    meaning: str


def config_reference(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[ConfigKey]:
    """Every key of the job config (sections flattened to dotted keys), with type, default and meaning.

    >>> keys = {k.key: k for k in config_reference()}
    >>> keys["output.mode"].type, keys["output.mode"].default
    ('error | overwrite | append | resume', 'error')
    >>> keys["input.storage.endpoint_url"].meaning.startswith("S3-compatible endpoint")
    True
    """
    keys = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += config_reference(annotation, key + ".")
            continue
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "required"
        else:
            value = info.default_factory() if info.default_factory is not None else info.default
            default = json.dumps(value, default=str) if not isinstance(value, str) else value or '""'
            default = "null" if value is None else default
        keys.append(ConfigKey(key, _type_name(annotation), default, info.description or ""))
    return keys


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def render_config_reference(markdown: bool = False) -> str:
    """The reference as text (for `run --help`) or as the Markdown page docs/config.md."""
    keys = config_reference()
    if markdown:
        lines = [
            "# Job config reference",
            "",
            ("<!-- Generated by `vb-batch config-reference > docs/config.md` from the pydantic models in "
             "vb_batch/config.py; do not edit by hand. -->"),
            "",
            ("Every key of a job config (YAML sections; override any as `key.path=value`), with its type, default "
             "and meaning."),
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        def cell(text: str) -> str:
            return text.replace("|", "\\|")
        lines += [f"| `{k.key}` | {cell(k.type)} | `{cell(k.default)}` | {cell(k.meaning)} |" for k in keys]
        return "\n".join(lines) + "\n"
    width = max(len(k.key) for k in keys)
    return "\n".join(f"  {k.key:{width}}  {k.meaning} [{k.type}; default {k.default}]" for k in keys)
