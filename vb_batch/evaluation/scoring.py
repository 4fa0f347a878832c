"""`vb-batch eval`: score an output's depth, normals and segmentation against ground truth.

    vb-batch eval PREDICTIONS                   # truth columns in the same table (kept input columns)
    vb-batch eval PREDICTIONS --truth TRUTH     # truth in another table, joined on the id column
    vb-batch eval out/ --truth kitti.parquet --truth-format depth=kitti-png --protocol kitti-eigen
    vb-batch eval out/ --confidence             # also: does the stored confidence rank the errors?

Predictions are found by field metadata (``vb.task``). Truth columns are found the same way
(``vb.role = truth``, as `vb_batch.evaluation.scenes` writes them) or declared with `truth_format`
(`vb_batch.evaluation.truth`: KITTI / NYU PNGs, metres, normals PNGs in a named frame, Cityscapes labelIds,
ADE20K, class ids). Segmentation classes are matched by *name*, so a job may list the classes in
any order or colour them any way. Rows that failed (`vb_error`) or have no truth are left out and
counted. The protocol (`vb_batch.evaluation.protocols`) sets crops, depth range, alignment and averaging;
metric definitions: `vb_batch.evaluation.metrics`; confidence quality: `vb_batch.evaluation.confidence`.

Next to the model, trivial baselines fitted on the evaluated truth itself (the best constant
of each kind, which flatters them): the median truth depth everywhere, the mean truth normal
everywhere, the most frequent truth class everywhere.

The result is a long table (method, task, metric, value, images), written as Parquet next to
the predictions (``<output>/_metrics.parquet``; files starting with ``_`` are not rows of the
output) and printed side by side.

Example:
    >>> from vb_batch.evaluation.scoring import evaluate, render_metrics
    >>> metrics = evaluate("out/")            # doctest: +SKIP
    >>> print(render_metrics(metrics))        # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vb_batch.codecs import normals as normals_codec
from vb_batch.evaluation.confidence import THRESHOLDS, sparsification, threshold_table
from vb_batch.evaluation.metrics import (
    DepthAccumulator,
    NormalsAccumulator,
    SegmentationAccumulator,
)
from vb_batch.evaluation.protocols import get_protocol
from vb_batch.evaluation.truth import (
    TruthColumn,
    TruthFormat,
    class_lookup,
    parse_truth_format,
)
from vb_batch.io.encodings import ColumnMeta
from vb_batch.io.outputs import load_arrays
from vb_batch.pipeline.grid import resize_values

log = logging.getLogger(__name__)

EVAL_TASKS = ("depth", "normals", "segmentation")
MODEL = "model"
BASELINES = {
    "depth": "const median depth",
    "normals": "const mean normal",
    "segmentation": "majority class",
}
METRICS_NAME = "_metrics.parquet"
METRICS_SCHEMA = pa.schema([
    pa.field("method", pa.string()), pa.field("task", pa.string()), pa.field("metric", pa.string()),
    pa.field("value", pa.float64()), pa.field("images", pa.int64()),
])
ROWS_PER_READ = 64
# One truth depth pixel in this many feeds the baseline's median (bounded memory, deterministic).
MEDIAN_STRIDE = 16


@dataclass(frozen=True)
class MapColumn:
    name: str
    meta: ColumnMeta


def map_columns(schema: pa.Schema, truth: bool) -> dict[str, MapColumn]:
    """{task: column} of the truth columns (`truth=True`) or of the predictions, by field metadata."""
    found: dict[str, MapColumn] = {}
    for field in schema:
        if not field.metadata or b"vb.kind" not in field.metadata:
            continue
        meta = ColumnMeta.from_metadata(field.metadata)
        if (meta.extra.get("role") == "truth") != truth or meta.task not in EVAL_TASKS:
            continue
        if meta.task in found:
            log.warning("eval: several %s columns (%s, %s); using %s", meta.task, found[meta.task].name, field.name,
                        found[meta.task].name)
            continue
        found[meta.task] = MapColumn(field.name, meta)
    return found


def _read(source: str | pa.Table) -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    from vb_batch.io.outputs import read_output

    return read_output(source)


def _id_column(table: pa.Table) -> str:
    job = json.loads((table.schema.metadata or {}).get(b"vb.job", b"{}"))
    return job.get("input", {}).get("id_column", "id")


class _Baselines:
    """The constants of the trivial baselines, fitted on the evaluated truth."""

    def __init__(self) -> None:
        self.depth_samples: list[np.ndarray] = []
        self.normal_sum = np.zeros(3)
        self.class_counts: np.ndarray | None = None

    def fit(self, task: str, truth: np.ndarray, num_classes: int = 0) -> None:
        if task == "depth":
            finite = truth[np.isfinite(truth)]
            self.depth_samples.append(finite[::MEDIAN_STRIDE])
        elif task == "normals":
            valid = truth.reshape(-1, 3)
            self.normal_sum += valid[np.isfinite(valid).all(axis=1)].sum(axis=0)
        else:
            ids = truth.astype(np.int64).ravel()
            counts = np.bincount(ids[(ids >= 0) & (ids < num_classes)], minlength=num_classes)
            self.class_counts = counts if self.class_counts is None else self.class_counts + counts

    def predict(self, task: str, truth: np.ndarray) -> np.ndarray:
        if task == "depth":
            samples = np.concatenate(self.depth_samples) if self.depth_samples else np.array([1.0])
            return np.full(truth.shape, float(np.median(samples)), dtype=np.float32)
        if task == "normals":
            norm = np.linalg.norm(self.normal_sum)
            mean = self.normal_sum / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
            return np.broadcast_to(mean.astype(np.float32), truth.shape)
        return np.full(truth.shape, int(np.argmax(self.class_counts)), dtype=np.int64)


@dataclass(frozen=True)
class TruthSource:
    """Where one task's truth comes from: field metadata (vb_batch's own) or a declared encoding."""

    task: str
    column: str
    class_names: list[str] | None
    frame: str
    declared: TruthColumn | None = None

    def read(self, part: pa.Table, ids: list[Any]) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
        """Per row: (truth values, companion) or None; the companion is the declared validity mask
        (depth) or instance ids (segmentation), None when the truth declares none."""
        if self.declared is None:
            return [None if values is None else (values, None) for values in load_arrays(part, self.column)]
        declared = self.declared
        companions = (part.column(declared.companion).to_pylist() if declared.companion
                      else [None] * part.num_rows)
        out: list[tuple[np.ndarray, np.ndarray | None] | None] = []
        for row_id, cell, companion_cell in zip(ids, part.column(self.column).to_pylist(), companions):
            if cell is None:
                out.append(None)
                continue
            try:
                values = declared.decode(cell)
            except Exception as exc:
                raise ValueError(f"eval: truth row {row_id!r}, column {self.column!r}: cannot read it as "
                                 f"{declared.encoding}: {exc}; check --truth-format") from exc
            companion = None
            if companion_cell is not None and declared.decode_companion is not None:
                try:
                    companion = declared.decode_companion(companion_cell)
                except Exception as exc:
                    raise ValueError(f"eval: truth row {row_id!r}, column {declared.companion!r}: cannot read it: "
                                     f"{exc}; check --truth-format") from exc
                if companion.shape != values.shape[:2]:
                    raise ValueError(f"eval: truth row {row_id!r}: column {declared.companion!r} is "
                                     f"{companion.shape}, the truth {values.shape[:2]}; they must cover the same pixels")
            out.append((values, companion))
        return out


def truth_sources(table: pa.Table, truth_format: str | dict | None) -> tuple[str, dict[str, TruthSource]]:
    """(id column, {task: source}) of a truth table: by `truth_format`, else by vb.role = truth metadata."""
    if truth_format is None:
        sources = {}
        for task, col in map_columns(table.schema, truth=True).items():
            names = [n for n, _ in (col.meta.legend or [])] if task == "segmentation" else None
            if task == "segmentation" and not names:
                raise ValueError(f"eval: truth column {col.name!r} has no vb.legend")
            sources[task] = TruthSource(task, col.name, names, col.meta.frame or "opengl")
        return _id_column(table), sources
    declared = truth_format if isinstance(truth_format, TruthFormat) else parse_truth_format(truth_format)
    missing = [name for c in declared.columns.values() for name in (c.column, c.companion)
               if name is not None and name not in table.column_names]
    if declared.id_column not in table.column_names:
        missing.insert(0, declared.id_column)
    if missing:
        raise ValueError(f"eval: truth columns {missing} (from --truth-format) are not in the truth table; its columns: "
                         f"{table.column_names}; name them with task=encoding:column or column: in the YAML")
    return declared.id_column, {
        task: TruthSource(task, c.column, c.class_names, c.frame, declared=c) for task, c in declared.columns.items()
    }


@dataclass
class Scores:
    """The metrics table and, per task, each scored row's stored confidence and its own errors."""

    metrics: pa.Table
    rows: dict[str, list[tuple[Any, float | None, dict[str, float]]]]


def evaluate(
    predictions: str | pa.Table,
    truth: str | pa.Table | None = None,
    baselines: bool = True,
    max_depth: float | None = None,
    protocol: str = "generic",
    truth_format: str | dict | None = None,
    alignment: str | None = None,
    averaging: str | None = None,
    min_depth: float | None = None,
    alignment_max_res: int | None = None,
) -> pa.Table:
    """The metrics table of `predictions` against `truth` (default: truth columns of `predictions`).

    `protocol` names a benchmark's protocol (`vb_batch.evaluation.protocols`); `alignment`,
    `averaging`, `min_depth`, `max_depth` and `alignment_max_res` (0: fit at full resolution)
    override its choices. `truth_format` declares the truth's encodings
    (`vb_batch.evaluation.truth`) when the truth is not vb_batch's own.
    """
    return score(predictions, truth, baselines, max_depth, protocol, truth_format, alignment, averaging,
                 min_depth, alignment_max_res).metrics


def score(
    predictions: str | pa.Table,
    truth: str | pa.Table | None = None,
    baselines: bool = True,
    max_depth: float | None = None,
    protocol: str = "generic",
    truth_format: str | dict | None = None,
    alignment: str | None = None,
    averaging: str | None = None,
    min_depth: float | None = None,
    alignment_max_res: int | None = None,
) -> Scores:
    """`evaluate`, keeping each row's errors next to its stored confidence (for `vb_batch.evaluation.confidence`)."""
    chosen = get_protocol(protocol).with_options(alignment, averaging, min_depth, max_depth, alignment_max_res)
    pred_table = _read(predictions)
    truth_table = pred_table if truth is None else _read(truth)
    pred_cols = map_columns(pred_table.schema, truth=False)
    truth_id_column, truth_cols = truth_sources(truth_table, truth_format)
    tasks = [t for t in EVAL_TASKS if t in pred_cols and t in truth_cols]
    if not tasks:
        raise ValueError(
            f"eval: no task has both a prediction and a truth column: predictions {sorted(pred_cols)}, "
            f"truth {sorted(truth_cols)} (truth columns carry vb.role = truth field metadata, see vb_batch.evaluation.scenes, "
            "or declare them with --truth-format, e.g. depth=kitti-png)"
        )

    # Pair each successful prediction row with its truth row.
    pred_ids = pred_table.column(_id_column(pred_table)).to_pylist()
    truth_ids = truth_table.column(truth_id_column).to_pylist()
    truth_row = {row_id: i for i, row_id in enumerate(truth_ids)}
    errors = pred_table.column("vb_error").to_pylist() if "vb_error" in pred_table.column_names else [None] * len(pred_ids)
    pairs = [(i, truth_row[row_id]) for i, row_id in enumerate(pred_ids) if errors[i] is None and row_id in truth_row]
    failed = sum(e is not None for e in errors)
    missing = sum(e is None and row_id not in truth_row for row_id, e in zip(pred_ids, errors))
    if not pairs:
        raise ValueError(f"eval: no row to score ({failed} failed, {missing} without a truth row)")

    truth_names = {t: truth_cols[t].class_names or [] for t in tasks}
    mapping = None
    if "segmentation" in tasks:
        pred_names = [n for n, _ in (pred_cols["segmentation"].meta.legend or [])]
        declared = truth_cols["segmentation"].declared
        mapping = class_lookup(pred_names, truth_names["segmentation"], declared.class_map if declared else None,
                               pred_cols["segmentation"].name)
    confidence_columns = {
        t: pred_cols[t].name + "_confidence" for t in tasks if pred_cols[t].name + "_confidence" in pred_table.column_names
    }

    def chunks():
        for start in range(0, len(pairs), ROWS_PER_READ):
            chunk = pairs[start : start + ROWS_PER_READ]
            pred_part = pred_table.take([p for p, _ in chunk])
            truth_part = truth_table.take([t for _, t in chunk])
            ids = [pred_ids[p] for p, _ in chunk]
            for task in tasks:
                confidences = (pred_part.column(confidence_columns[task]).to_pylist() if task in confidence_columns
                               else [None] * len(chunk))
                yield (task, ids, confidences, load_arrays(pred_part, pred_cols[task].name),
                       truth_cols[task].read(truth_part, ids))

    fitted = _Baselines()
    if baselines:
        for task, _, _, _, truths in chunks():
            for entry in truths:
                if entry is not None:
                    fitted.fit(task, entry[0], len(truth_names[task]))

    accumulators: dict[tuple[str, str], Any] = {}
    for task in tasks:
        methods = [MODEL] + ([BASELINES[task]] if baselines else [])
        for method in methods:
            if task == "depth":
                metric = method != MODEL or not pred_cols[task].meta.unit.startswith("relative")
                accumulators[method, task] = DepthAccumulator(
                    chosen.min_depth, chosen.max_depth, metric=metric, alignment=chosen.alignment,
                    per_image=chosen.depth_averaging == "per-image", eval_mask=chosen.eval_mask,
                    alignment_max_res=chosen.alignment_max_res)
            elif task == "normals":
                accumulators[method, task] = NormalsAccumulator(per_image=chosen.normals_averaging == "per-image")
            else:
                declared = truth_cols[task].declared
                accumulators[method, task] = SegmentationAccumulator(
                    truth_names[task], categories=declared.categories if declared else None,
                    instance_sizes=declared.instance_sizes if declared else None)
    images = dict.fromkeys(tasks, 0)
    rows: dict[str, list] = {task: [] for task in tasks}
    for task, ids, confidences, preds, truths in chunks():
        for row_id, confidence, pred, entry in zip(ids, confidences, preds, truths):
            if pred is None or entry is None:
                continue
            true, companion = entry
            kind = "classes" if task == "segmentation" else task
            pred = resize_values(np.asarray(pred), kind, true.shape[:2])
            if chosen.pre_crop is not None:
                pred, true = chosen.pre_crop(pred), chosen.pre_crop(true)
                companion = None if companion is None else chosen.pre_crop(companion)
            if task == "normals":
                pred = normals_codec.convert(pred, pred_cols[task].meta.frame or "opengl", truth_cols[task].frame)
            if task == "segmentation":
                pred = mapping[pred.astype(np.int64)]
            # The companion: the dataset's validity mask (depth) or instance ids (segmentation).
            extra = ({"truth_mask": companion} if task == "depth" else
                     {"instances": companion} if task == "segmentation" else {})
            row_errors = accumulators[MODEL, task].add(pred, true, **extra)
            if row_errors is not None:
                rows[task].append((row_id, confidence, row_errors))
            if baselines:
                accumulators[BASELINES[task], task].add(fitted.predict(task, true), true, **extra)
            images[task] += 1

    table_rows = []
    for (method, task), accumulator in accumulators.items():
        for metric, value in accumulator.result().items():
            table_rows.append({"method": method, "task": task, "metric": metric, "value": float(value),
                               "images": images[task]})
    model_ids = sorted(set(pred_table.column("vb_model").to_pylist())) if "vb_model" in pred_table.column_names else []
    metadata = {
        b"vb.model": ", ".join(str(m) for m in model_ids).encode(),
        b"vb.predictions": (predictions if isinstance(predictions, str) else "<table>").encode(),
        b"vb.truth": (truth if isinstance(truth, str) else "<same table>" if truth is None else "<table>").encode(),
        b"vb.rows": json.dumps({"scored": len(pairs), "failed": failed, "without_truth": missing}).encode(),
        b"vb.protocol": json.dumps({"name": chosen.name, "min_depth": chosen.min_depth, "max_depth": chosen.max_depth,
                                    "alignment": chosen.alignment, "alignment_max_res": chosen.alignment_max_res,
                                    "depth_averaging": chosen.depth_averaging,
                                    "normals_averaging": chosen.normals_averaging, "source": chosen.source}).encode(),
    }
    return Scores(pa.Table.from_pylist(table_rows, schema=METRICS_SCHEMA.with_metadata(metadata)), rows)


# The per-row error each task's confidence is judged by (`confidence_report`).
ROW_ERRORS = {"depth": "abs_rel", "normals": "mean_deg", "segmentation": "pixel_error"}


def confidence_report(scores: Scores, thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    """Per task: sparsification (AUSE) and threshold tables of each row's error by its stored confidence."""
    report = {}
    for task, entries in scores.rows.items():
        errors, confidences = [], []
        for _, confidence, row_errors in entries:
            if task == "segmentation":
                error = 1.0 - row_errors["pixel_accuracy"]
            else:
                key = ROW_ERRORS[task]
                error = row_errors.get(key, row_errors.get(f"{key}_aligned"))
            errors.append(error)
            confidences.append(np.nan if confidence is None else confidence)
        report[task] = {"error": ROW_ERRORS[task], "unit": "row",
                        "sparsification": sparsification(errors, confidences),
                        "thresholds": threshold_table(errors, confidences, thresholds)}
    return report


def metrics_path(predictions: str) -> str:
    """Default place of the metrics table: inside an output directory, else beside the file."""
    from vb_batch.io.filesystems import fsspec_filesystem

    fs, root = fsspec_filesystem(predictions, None)
    if fs.isdir(root):
        return predictions.rstrip("/") + "/" + METRICS_NAME
    stem, _ = posixpath.splitext(predictions)
    return stem + METRICS_NAME


def write_metrics(metrics: pa.Table, path: str) -> str:
    from vb_batch.io.filesystems import fsspec_filesystem

    fs, target = fsspec_filesystem(path, None)
    with fs.open(target, "wb") as f:
        pq.write_table(metrics, f)
    return path


def metrics_json(metrics: pa.Table) -> dict[str, Any]:
    """{method: {task: {metric: value}}} plus row counts: the form of benchmarks/results/demo_eval.json."""
    out: dict[str, Any] = {"model": (metrics.schema.metadata or {}).get(b"vb.model", b"").decode(),
                           "rows": json.loads((metrics.schema.metadata or {}).get(b"vb.rows", b"{}")), "methods": {}}
    for row in metrics.to_pylist():
        task = out["methods"].setdefault(row["method"], {}).setdefault(row["task"], {"images": row["images"]})
        task[row["metric"]] = None if math.isnan(row["value"]) else round(row["value"], 4)
    return out


def render_metrics(metrics: pa.Table) -> str:
    """The metrics side by side: one line per task and metric, one column per method."""
    rows = metrics.to_pylist()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    value = {(r["method"], r["task"], r["metric"]): r["value"] for r in rows}
    width = max(len(f"{t} {m}") for t, m in keys)
    columns = [max(len(m), 8) for m in methods]
    lines = [" " * width + "  " + "  ".join(m.rjust(c) for m, c in zip(methods, columns))]
    for task, metric in keys:
        cells = []
        for method, c in zip(methods, columns):
            v = value.get((method, task, metric))
            cells.append(("-" if v is None else "nan" if math.isnan(v) else f"{v:.3f}").rjust(c))
        lines.append(f"{task} {metric}".ljust(width) + "  " + "  ".join(cells))
    meta = metrics.schema.metadata or {}
    rows_info = json.loads(meta.get(b"vb.rows", b"{}"))
    header = f"model: {meta.get(b'vb.model', b'?').decode()}"
    if rows_info:
        header += (f"; rows scored {rows_info.get('scored')}, failed {rows_info.get('failed')}, "
                   f"without truth {rows_info.get('without_truth')}")
    return header + "\n" + "\n".join(lines)
