"""Task registry: what to ask the model for each task, how to read its painting back, what to store.

A task is a prompt (a template in the Vision Banana style that a model profile
may override), a codec that turns the painted RGB into values, and the output
columns: the stored map, a per-row confidence and summary scalars that make the
lake queryable without decoding.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from vb_batch.codecs import Decoded
from vb_batch.codecs import depth as depth_codec
from vb_batch.codecs import normals as normals_codec
from vb_batch.codecs import segmentation as seg_codec
from vb_batch.io.encodings import ColumnMeta, depth_png_params
from vb_batch.registry import Registry

FRACTIONS_TYPE = pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("fraction", pa.float32())]))
# `segmentation.fractions: map`: one lookup by name in SQL, `segmentation_fractions['car']`, no lambda.
FRACTIONS_MAP_TYPE = pa.map_(pa.string(), pa.float32())
FRACTION_FORMATS = ("list", "columns", "map")
# The referred object is one white class; every other colour is background.
REFERRING_LEGEND = seg_codec.Legend.from_pairs([("object", (255, 255, 255))])


@dataclass(frozen=True)
class TaskContext:
    """Everything the tasks need from the job config and the model profile, resolved once per job."""

    depth_preset: Any = "vision-banana"
    depth_relative: bool = False
    frame: str = "opengl"
    legend: seg_codec.Legend | None = None
    max_distance: float | None = None
    ensemble: int = 1
    phrase: str | None = None
    phrase_column: str | None = None
    templates: dict[str, str] = field(default_factory=dict)
    fractions: str = "list"  # segmentation.fractions: one of FRACTION_FORMATS

    def template(self, task: str) -> str:
        """The profile's prompt for `task`, or the task's own default."""
        return self.templates.get(task) or TASKS[task].default_template


def context_of(meta: ColumnMeta) -> TaskContext:
    """The part of a job's TaskContext that a stored map column's meaning records (for reading an output back)."""
    legend = seg_codec.Legend.from_pairs(meta.legend) if meta.legend else None
    return TaskContext(
        depth_relative=meta.unit.startswith("relative"), frame=meta.frame or "opengl", legend=legend,
        fractions=meta.extra.get("fractions", "list"),
    )


def fraction_suffix(class_name: str) -> str:
    """`_frac_<class>`: the column suffix of one class's pixel fraction, a plain SQL name (lower case, `_`)."""
    return "_frac_" + re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def fraction_column_clashes(names: list[str]) -> list[str]:
    """Class names that give no column name, or the same one (SQL engines ignore case): listed for the error."""
    seen: dict[str, str] = {}
    bad = []
    for name in names:
        suffix = fraction_suffix(name)
        if suffix == "_frac_" or suffix in seen:
            bad.append(repr(name) if suffix == "_frac_" else f"{seen[suffix]!r} and {name!r}")
        seen.setdefault(suffix, name)
    return bad


def legend_text(legend: seg_codec.Legend) -> str:
    return ", ".join(f"{name} = ({r}, {g}, {b})" for name, (r, g, b) in legend.to_pairs())


class Task:
    """Base of the four tasks; subclasses set `name` and `kind` and implement decode and summary."""

    name: ClassVar[str]
    kind: ClassVar[str]  # storage kind in vb_batch.io.encodings.KINDS
    default_template: ClassVar[str]  # the prompt, unless the model profile has its own
    template_slots: ClassVar[tuple[str, ...]] = ()  # slots every prompt template must keep

    def passes(self, ctx: TaskContext) -> int:
        """How many times the model paints this task per image (test-time ensembling)."""
        return 1

    def prompts(self, ctx: TaskContext, n: int, pass_index: int = 0, phrases: list[str] | None = None) -> list[str]:
        return [ctx.template(self.name)] * n

    def decode(self, paintings: list[np.ndarray], ctx: TaskContext) -> Decoded:
        """The painted RGB of every pass for one image -> values and per-pixel confidence."""
        return self.combine([self.decode_pass(rgb, ctx, i) for i, rgb in enumerate(paintings)], ctx)

    def decode_pass(self, rgb: Any, ctx: TaskContext, pass_index: int = 0) -> Decoded:
        """The colour codec alone, on one pass's painting: numpy or torch (on its device), one or a batch."""
        raise NotImplementedError

    def combine(self, decodes: list[Decoded], ctx: TaskContext) -> Decoded:
        """One image's decoded passes (numpy) -> the stored values and confidence."""
        return decodes[0]

    def column_meta(self, ctx: TaskContext, encoding: str) -> ColumnMeta:
        raise NotImplementedError

    def summary_fields(self, ctx: TaskContext) -> list[tuple[str, pa.DataType]]:
        """(suffix, type) of the summary scalars; the column is `<prefix><task><suffix>`."""
        return []

    def summarise(self, values: np.ndarray, ctx: TaskContext) -> dict[str, Any]:
        return {}

    def column_notes(self, ctx: TaskContext) -> dict[str, tuple[str, str]]:
        """{suffix: (unit, meaning)} of the map ("") and every column the task adds (`vb-batch describe`)."""
        return {"_confidence": ("0..1", "mean per-pixel confidence of the decoded painting (null: native output)")}


class DepthTask(Task):
    name = "depth"
    kind = "depth"
    default_template = (
        "Estimate the metric depth of this image. Paint it as a colour map that walks the RGB cube "
        "from near to far: black, red, yellow, green, cyan, blue, magenta, white; sky and anything "
        "beyond range = white."
    )

    def decode_pass(self, rgb, ctx, pass_index=0):
        return depth_codec.decode(rgb, preset=ctx.depth_preset)

    def combine(self, decodes, ctx):
        decoded = decodes[0]
        if not ctx.depth_relative:
            return decoded
        # A relative painting means its position along the walk, f in [0, 1] (far = 1), not metres.
        position = depth_codec.squash(decoded.values, ctx.depth_preset).astype(np.float32)
        return Decoded(values=position, confidence=decoded.confidence)

    def column_meta(self, ctx, encoding):
        scale, offset = depth_png_params(ctx.depth_relative) if encoding == "png" else (None, None)
        preset = ctx.depth_preset
        if not isinstance(preset, str):
            # A preset given as parameters is stored with them: two custom mappings never look alike.
            fields = dataclasses.asdict(depth_codec.get_preset(preset))
            preset = json.dumps({"name": fields.pop("name"), **fields}, sort_keys=True, default=list)
        unit = "relative (affine-invariant)" if ctx.depth_relative else "m"
        return ColumnMeta(
            kind="depth", encoding=encoding, unit=unit, task=self.name, scale=scale, offset=offset,
            extra={"preset": str(preset)},
        )

    def summary_fields(self, ctx):
        unit = "rel" if ctx.depth_relative else "m"
        return [(f"_min_{unit}", pa.float32()), (f"_median_{unit}", pa.float32()), (f"_max_{unit}", pa.float32())]

    def summarise(self, values, ctx):
        finite = values[np.isfinite(values)]
        stats = (None, None, None) if finite.size == 0 else (finite.min(), np.median(finite), finite.max())
        return {suffix: None if v is None else float(v) for (suffix, _), v in zip(self.summary_fields(ctx), stats)}

    def column_notes(self, ctx):
        unit = "relative (0 near .. 1 far)" if ctx.depth_relative else "m"
        words = ("smallest", "median", "largest")
        notes = {"": (unit, "depth map; NaN = invalid, +inf = far / sky")}
        notes.update({suffix: (unit, f"{word} finite depth of the row")
                      for (suffix, _), word in zip(self.summary_fields(ctx), words)})
        return {**super().column_notes(ctx), **notes}


class NormalsTask(Task):
    name = "normals"
    kind = "normals"
    default_template = (
        "Estimate the surface normals of this image. Paint each pixel's unit normal as colour "
        "(n + 1) / 2: red = x to the right, green = y up, blue = z toward the viewer."
    )

    def decode_pass(self, rgb, ctx, pass_index=0):
        return normals_codec.decode(rgb, frame=ctx.frame)

    def column_meta(self, ctx, encoding):
        return ColumnMeta(kind="normals", encoding=encoding, unit="unit vector", task=self.name, frame=ctx.frame)

    def column_notes(self, ctx):
        return {**super().column_notes(ctx), "": ("unit vector", f"surface normal per pixel (x, y, z), {ctx.frame} frame")}


class SegmentationTask(Task):
    name = "segmentation"
    kind = "classes"
    default_template = (
        "Segment this image. Paint every pixel with the colour of its class: {legend}; anything else = black."
    )
    # Each ensemble pass fills in its own permuted legend.
    template_slots = ("{legend}",)

    def passes(self, ctx):
        return ctx.ensemble

    def pass_legend(self, ctx: TaskContext, pass_index: int) -> seg_codec.Legend:
        # Pass 0 paints with the legend as configured; later passes permute colours among classes.
        return ctx.legend if pass_index == 0 else ctx.legend.permuted(pass_index)

    def prompts(self, ctx, n, pass_index=0, phrases=None):
        text = ctx.template(self.name).format(legend=legend_text(self.pass_legend(ctx, pass_index)))
        return [text] * n

    def decode_pass(self, rgb, ctx, pass_index=0):
        return seg_codec.decode(rgb, self.pass_legend(ctx, pass_index), max_distance=ctx.max_distance)

    def combine(self, decodes, ctx):
        return decodes[0] if len(decodes) == 1 else seg_codec.vote(decodes)

    def column_meta(self, ctx, encoding):
        # The fraction format is recorded only when it is not the default, so that outputs written
        # before it existed keep their meaning (and their fingerprint).
        extra = {"fractions": ctx.fractions} if ctx.fractions != "list" else {}
        return ColumnMeta(
            kind="classes", encoding=encoding, unit="class id", task=self.name,
            legend=ctx.legend.to_pairs(), unlabelled=ctx.legend.unlabelled, extra=extra,
        )

    def summary_fields(self, ctx):
        if ctx.fractions == "columns":
            return [(fraction_suffix(name), pa.float32()) for name in ctx.legend.names]
        return [("_fractions", FRACTIONS_MAP_TYPE if ctx.fractions == "map" else FRACTIONS_TYPE)]

    def summarise(self, values, ctx):
        counts = np.bincount(values.ravel().astype(np.int64), minlength=len(ctx.legend))[: len(ctx.legend)]
        fractions = [float(f) for f in counts / max(values.size, 1)]
        names = ctx.legend.names
        if ctx.fractions == "columns":
            return {fraction_suffix(name): f for name, f in zip(names, fractions)}
        if ctx.fractions == "map":
            return {"_fractions": list(zip(names, fractions))}
        return {"_fractions": [{"name": n, "fraction": f} for n, f in zip(names, fractions)]}

    def column_notes(self, ctx):
        notes = {"": ("class id", f"class per pixel; unlabelled = {ctx.legend.unlabelled if ctx.legend else 255}"),
                 "_confidence": ("0..1", "mean per-pixel confidence (the vote share when ensembling)")}
        share = "fraction (0..1)"
        if ctx.fractions == "columns" and ctx.legend:
            notes.update({fraction_suffix(name): (share, f"share of the row's pixels of class {name!r}")
                          for name in ctx.legend.names})
        elif ctx.fractions == "map":
            notes["_fractions"] = (share, "class name -> pixel fraction, e.g. segmentation_fractions['car']")
        else:
            notes["_fractions"] = (share, "[{name, fraction}] for every legend class")
        return {**super().column_notes(ctx), **notes}


class ReferringTask(Task):
    name = "referring"
    kind = "mask"
    default_template = "Segment {phrase}. Paint {phrase} white and everything else black."
    template_slots = ("{phrase}",)

    def prompts(self, ctx, n, pass_index=0, phrases=None):
        phrases = phrases if phrases is not None else [ctx.phrase] * n
        return [ctx.template(self.name).format(phrase=p) for p in phrases]

    def decode_pass(self, rgb, ctx, pass_index=0):
        return seg_codec.decode(rgb, REFERRING_LEGEND, max_distance=ctx.max_distance)

    def combine(self, decodes, ctx):
        # Class 0 of the referring legend is the object.
        return Decoded(values=(np.asarray(decodes[0].values) == 0).astype(np.uint8), confidence=decodes[0].confidence)

    def column_meta(self, ctx, encoding):
        return ColumnMeta(kind="mask", encoding=encoding, unit="mask (1 = referred object)", task=self.name)

    def summary_fields(self, ctx):
        return [("_fraction", pa.float32())]

    def summarise(self, values, ctx):
        return {"_fraction": float(values.mean()) if values.size else None}

    def column_notes(self, ctx):
        return {**super().column_notes(ctx), "": ("mask", "1 = the referred object, 0 = elsewhere"),
                "_fraction": ("fraction (0..1)", "share of the row's pixels on the referred object")}


# The one list of task names (config validation, profiles' templates and the stages all ask it).
TASKS: Registry[Task] = Registry(
    "task", field="tasks", entries={t.name: t for t in (DepthTask(), NormalsTask(), SegmentationTask(), ReferringTask())}
)


def get_task(name: str) -> Task:
    return TASKS[name]


def build_legend(classes: list[str] | None, legend: dict[str, Any] | None, palette: str = "generated"):
    """The segmentation legend from config: explicit colours, or names coloured from a palette."""
    if legend:
        return seg_codec.Legend.from_pairs([(name, tuple(int(c) for c in rgb)) for name, rgb in legend.items()])
    if classes:
        if palette == "cityscapes":
            return seg_codec.Legend.from_names(classes, palette="cityscapes")
        return seg_codec.Legend.from_names(classes)
    return None
