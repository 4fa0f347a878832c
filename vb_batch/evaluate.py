"""`vb-batch eval`: score an output's depth, normals and segmentation against ground truth.

    vb-batch eval PREDICTIONS                   # truth columns in the same table (kept input columns)
    vb-batch eval PREDICTIONS --truth TRUTH     # truth in another table, joined on the id column

Which column is what comes from field metadata alone: truth columns carry ``vb.role = truth``
(as `vb_batch.scenes` writes them), predictions are the other map columns; both are matched by
``vb.task``. Segmentation classes are matched by *name* through the two legends, so a job may
list the classes in any order or colour them any way. Rows that failed (`vb_error`) or have no
truth are left out and counted. Metric definitions: `vb_batch.metrics`.

Next to the model, trivial baselines fitted on the evaluated truth itself (the best constant
of each kind, which flatters them): the median truth depth everywhere, the mean truth normal
everywhere, the most frequent truth class everywhere.

The result is a long table (method, task, metric, value, images), written as Parquet next to
the predictions (``<output>/_metrics.parquet``; files starting with ``_`` are not rows of the
output) and printed side by side.

Example:
    >>> from vb_batch.evaluate import evaluate, render_metrics
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
from vb_batch.io.encodings import ColumnMeta
from vb_batch.io.outputs import load_arrays
from vb_batch.metrics import DEFAULT_MAX_DEPTH_M, DepthAccumulator, NormalsAccumulator, SegmentationAccumulator
from vb_batch.stages import resize_values

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


def _class_mapping(pred: ColumnMeta, truth_names: list[str]) -> np.ndarray:
    """Lookup table: predicted id -> index of the same class name in the truth (-1: none)."""
    mapping = np.full(65536, -1, dtype=np.int64)
    index = {name: i for i, name in enumerate(truth_names)}
    for pred_id, (name, _) in enumerate(pred.legend or []):
        mapping[pred_id] = index.get(name, -1)
    return mapping


def evaluate(
    predictions: str | pa.Table,
    truth: str | pa.Table | None = None,
    baselines: bool = True,
    max_depth: float = DEFAULT_MAX_DEPTH_M,
) -> pa.Table:
    """The metrics table of `predictions` against `truth` (default: truth columns of `predictions`)."""
    pred_table = _read(predictions)
    truth_table = pred_table if truth is None else _read(truth)
    pred_cols = map_columns(pred_table.schema, truth=False)
    truth_cols = map_columns(truth_table.schema, truth=True)
    tasks = [t for t in EVAL_TASKS if t in pred_cols and t in truth_cols]
    if not tasks:
        raise ValueError(
            f"eval: no task has both a prediction and a truth column: predictions {sorted(pred_cols)}, "
            f"truth {sorted(truth_cols)} (truth columns carry vb.role = truth field metadata, see vb_batch.scenes)"
        )

    # Pair each successful prediction row with its truth row.
    pred_ids = pred_table.column(_id_column(pred_table)).to_pylist()
    truth_row = {row_id: i for i, row_id in enumerate(truth_table.column(_id_column(truth_table)).to_pylist())}
    errors = pred_table.column("vb_error").to_pylist() if "vb_error" in pred_table.column_names else [None] * len(pred_ids)
    pairs = [(i, truth_row[row_id]) for i, row_id in enumerate(pred_ids) if errors[i] is None and row_id in truth_row]
    failed = sum(e is not None for e in errors)
    missing = sum(e is None and row_id not in truth_row for row_id, e in zip(pred_ids, errors))
    if not pairs:
        raise ValueError(f"eval: no row to score ({failed} failed, {missing} without a truth row)")

    truth_names = {t: [n for n, _ in (truth_cols[t].meta.legend or [])] for t in tasks}
    if "segmentation" in tasks and not truth_names["segmentation"]:
        raise ValueError(f"eval: truth column {truth_cols['segmentation'].name!r} has no vb.legend")

    def chunks():
        for start in range(0, len(pairs), ROWS_PER_READ):
            chunk = pairs[start : start + ROWS_PER_READ]
            pred_part = pred_table.take([p for p, _ in chunk])
            truth_part = truth_table.take([t for _, t in chunk])
            for task in tasks:
                yield task, load_arrays(pred_part, pred_cols[task].name), load_arrays(truth_part, truth_cols[task].name)

    fitted = _Baselines()
    if baselines:
        for task, _, truths in chunks():
            for values in truths:
                fitted.fit(task, values, len(truth_names[task]))

    accumulators: dict[tuple[str, str], Any] = {}
    for task in tasks:
        methods = [MODEL] + ([BASELINES[task]] if baselines else [])
        for method in methods:
            if task == "depth":
                metric = method != MODEL or not pred_cols[task].meta.unit.startswith("relative")
                accumulators[method, task] = DepthAccumulator(max_depth=max_depth, metric=metric)
            elif task == "normals":
                accumulators[method, task] = NormalsAccumulator()
            else:
                accumulators[method, task] = SegmentationAccumulator(truth_names[task])
    mapping = _class_mapping(pred_cols["segmentation"].meta, truth_names["segmentation"]) if "segmentation" in tasks else None
    images = dict.fromkeys(tasks, 0)
    for task, preds, truths in chunks():
        for pred, true in zip(preds, truths):
            if pred is None or true is None:
                continue
            kind = "classes" if task == "segmentation" else task
            pred = resize_values(np.asarray(pred), kind, true.shape[:2])
            if task == "normals":
                pred = normals_codec.convert(pred, pred_cols[task].meta.frame or "opengl", truth_cols[task].meta.frame or "opengl")
            if task == "segmentation":
                pred = mapping[pred.astype(np.int64)]
            accumulators[MODEL, task].add(pred, true)
            if baselines:
                accumulators[BASELINES[task], task].add(fitted.predict(task, true), true)
            images[task] += 1

    rows = []
    for (method, task), accumulator in accumulators.items():
        for metric, value in accumulator.result().items():
            rows.append({"method": method, "task": task, "metric": metric, "value": float(value), "images": images[task]})
    model_ids = sorted(set(pred_table.column("vb_model").to_pylist())) if "vb_model" in pred_table.column_names else []
    metadata = {
        b"vb.model": ", ".join(str(m) for m in model_ids).encode(),
        b"vb.predictions": (predictions if isinstance(predictions, str) else "<table>").encode(),
        b"vb.truth": (truth if isinstance(truth, str) else "<same table>" if truth is None else "<table>").encode(),
        b"vb.rows": json.dumps({"scored": len(pairs), "failed": failed, "without_truth": missing}).encode(),
    }
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA.with_metadata(metadata))


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
