"""The model stage's grouping (`ModelBatcher`): rows of one working size share calls across batches.

Property-tested over random streams of batches (mixed sizes, bad rows, empty
batches), call sizes and windows: every batch comes out once, in order, with
every row answered with its own seed; every call holds one key and at most
`model.batch_size` rows; no more than `model.group_window` rows wait; with the
whole stream in the window the calls are the fewest possible; and the answers
equal those of each batch run on its own.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from conftest import png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vb_batch.config import load_config
from vb_batch.io.encodings import column_to_arrays
from vb_batch.models.identity import IdentityBackend
from vb_batch.stages import (
    ERROR_COLUMN,
    IMAGE_COLUMN,
    ModelBatcher,
    Plan,
    answer_column,
    fetch_decode,
    group_window,
    row_seed,
    run_model,
)

SIZES = [(4, 4), (4, 6), (6, 4), (8, 8)]
PNGS = [png_bytes(np.full((h, w, 3), 40 * k, np.uint8)) for k, (h, w) in enumerate(SIZES)]
SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("image", pa.binary())])


class Keyed(IdentityBackend):
    """Keyed by image size; answers depend on the image and the row's seed; records every call's keys."""

    name = "keyed"

    def __init__(self, cfg, keyed: bool = True):
        super().__init__(cfg)
        self.keyed = keyed
        self.calls: list[list[tuple[int, int]]] = []

    def batch_key(self, image):
        return image.shape[:2] if self.keyed else None

    def predict(self, images, prompts, task, seeds):
        self.calls.append([image.shape[:2] for image in images])
        return [expected_answer(image, seed) for image, seed in zip(images, seeds)]


def expected_answer(image: np.ndarray, seed: int) -> np.ndarray:
    return ((image.astype(np.int64) + seed) % 256).astype(np.uint8)


def plan_for(batch_size: int, window: int | None, tasks=("depth",)) -> Plan:
    cfg = load_config({
        "input": {"path": "in.parquet", "min_side": 1},
        "tasks": list(tasks),
        "model": {"backend": "identity", "batch_size": batch_size, "group_window": window},
    })
    return Plan.build(cfg, SCHEMA, image_column="image")


def decoded_stream(cells: list[list[int | None]], plan: Plan) -> list[pa.RecordBatch]:
    """Batches of rows: a size index (a PNG of that size), -1 (bytes no decoder takes) or None (no image)."""
    batches, next_id = [], 0
    for row_cells in cells:
        ids = list(range(next_id, next_id + len(row_cells)))
        next_id += len(row_cells)
        images = [None if c is None else b"junk" if c < 0 else PNGS[c] for c in row_cells]
        batch = pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), pa.array(images, pa.binary())], schema=SCHEMA)
        batches.append(fetch_decode(batch, plan))
    return batches


def answers(batch: pa.RecordBatch, task: str = "depth", p: int = 0) -> list:
    return column_to_arrays(batch.column(batch.schema.get_field_index(answer_column(task, p))))


def fewest_calls(backend_sizes: list[tuple[int, int]], batch_size: int) -> int:
    return sum(math.ceil(n / batch_size) for n in Counter(backend_sizes).values())


streams = st.lists(st.lists(st.one_of(st.none(), st.integers(-1, len(SIZES) - 1)), max_size=6), max_size=8)


@pytest.mark.slow  # ~2 s: a property test over streams of batches
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells=streams, batch_size=st.integers(1, 5), window=st.integers(0, 12), keyed=st.booleans())
def test_every_row_answered_once_in_order_with_its_own_seed(cells, batch_size, window, keyed):
    plan = plan_for(batch_size, window)
    backend = Keyed(plan.cfg.model, keyed)
    batcher = ModelBatcher(plan, backend)
    stream = decoded_stream(cells, plan)
    out = []
    for batch in stream:
        out += batcher.add(batch)
        assert batcher.waiting <= window and batcher.held <= window + batch_size
    out += batcher.flush()
    assert batcher.waiting == 0 and not batcher.pools

    # Every batch once, in order, its rows in order, its decode errors kept.
    assert [b.column(0).to_pylist() for b in out] == [b.column(0).to_pylist() for b in stream]
    valid = []
    for before, after in zip(stream, out):
        errors = after.column(after.schema.get_field_index(ERROR_COLUMN)).to_pylist()
        assert errors == before.column(before.schema.get_field_index(ERROR_COLUMN)).to_pylist()
        images = column_to_arrays(before.column(before.schema.get_field_index(IMAGE_COLUMN)))
        for row_id, image, error, answer in zip(before.column(0).to_pylist(), images, errors, answers(after)):
            if error is None:
                np.testing.assert_array_equal(answer, expected_answer(image, row_seed(0, row_id)))
                valid.append(image.shape[:2])
            else:
                assert answer is None

    # Calls: one key each, at most batch_size rows, every valid row exactly once.
    assert sorted(s for call in backend.calls for s in call) == sorted(valid)
    assert all(0 < len(call) <= batch_size for call in backend.calls)
    if keyed:
        assert all(len(set(call)) == 1 for call in backend.calls)
        if window >= len(valid):  # the whole stream can wait: the fewest calls there can be
            assert len(backend.calls) == fewest_calls(valid, batch_size)
    else:
        assert len(backend.calls) == math.ceil(len(valid) / batch_size) or window < len(valid)

    # The same answers as each batch on its own (labels do not depend on batching).
    alone = Keyed(plan.cfg.model, keyed)
    for batch, grouped in zip(stream, out):
        assert run_model(batch, plan, alone).equals(grouped)


def test_mixed_sizes_in_small_batches_share_calls():
    """Sizes interleaved a, b, c, a, b, c...: batches of 3 each hold three sizes; grouped, calls are full."""
    plan = plan_for(3, None, tasks=("depth", "normals"))
    stream = decoded_stream([[k % 3 for k in range(start, start + 3)] for start in range(0, 18, 3)], plan)
    per_batch, grouped = Keyed(plan.cfg.model), Keyed(plan.cfg.model)
    for batch in stream:
        run_model(batch, plan, per_batch)
    batcher = ModelBatcher(plan, grouped)
    out = [b for batch in stream for b in batcher.add(batch)] + batcher.flush()
    assert len(per_batch.calls) == 6 * 3 * 2  # every batch: three sizes, two tasks
    assert len(grouped.calls) == 3 * 2 * 2 and all(len(call) == 3 for call in grouped.calls)
    assert len(out) == 6 and all(a is not None for b in out for task in ("depth", "normals") for a in answers(b, task))
    assert group_window(plan.cfg) == 12  # 4 batches by default


def test_a_size_that_never_fills_a_call_does_not_hold_the_stream():
    """One odd-size row, then a long run of another size: the odd row runs once the window is spent."""
    plan = plan_for(2, 3)
    backend = Keyed(plan.cfg.model)
    batcher = ModelBatcher(plan, backend)
    stream = decoded_stream([[3, 0]] + [[0, 0]] * 20, plan)
    handed_back, held = [], []
    for batch in stream:
        handed_back.append(len(batcher.add(batch)))
        held.append(len(batcher.batches))
    assert sum(handed_back) + len(batcher.flush()) == 21
    assert handed_back[:3] == [0, 0, 2] and max(held) <= 3  # the odd row ran once over 5 rows were held
    assert sum(1 for call in backend.calls if call == [SIZES[3]]) == 1


def test_a_failing_call_fails_only_its_rows_and_others_keep_their_calls():
    """A backend that raises on one size: those rows get model_error (retried singly), the others are answered."""

    class FailsOnWide(Keyed):
        def predict(self, images, prompts, task, seeds):
            if any(image.shape[:2] == SIZES[1] for image in images):
                raise RuntimeError("no wide images today")
            return super().predict(images, prompts, task, seeds)

    plan = plan_for(4, 8)
    backend = FailsOnWide(plan.cfg.model)
    batcher = ModelBatcher(plan, backend)
    stream = decoded_stream([[0, 1, 2], [1, 0, 3], [2, 2]], plan)
    out = [b for batch in stream for b in batcher.add(batch)] + batcher.flush()
    errors = [e for b in out for e in b.column(b.schema.get_field_index(ERROR_COLUMN)).to_pylist()]
    codes = [e and e["code"] for e in errors]
    assert codes == [None, "model_error", None, "model_error", None, None, None, None]
    assert "no wide images today" in errors[1]["message"]


def test_group_window_is_validated_and_named():
    from vb_batch.config import ConfigError

    with pytest.raises(ConfigError, match="model.group_window"):
        load_config({"input": {"path": "in.parquet"}, "model": {"backend": "identity", "group_window": -1}})
    assert group_window(plan_for(8, 0).cfg) == 0


def test_a_ray_actor_takes_the_window_only_for_backends_with_working_sizes():
    from vb_batch.stages import model_rows_at_once

    def cfg(backend, window=None):
        return load_config({"input": {"path": "in.parquet"}, "model": {
            "backend": backend, "batch_size": 8, "group_window": window, "path": "ckpt" if backend != "identity" else None,
        }})

    assert model_rows_at_once(cfg("identity")) == 8  # no working sizes: nothing to group, no extra memory
    assert model_rows_at_once(cfg("demo")) == 8 + 32
    assert model_rows_at_once(cfg("marigold", 5)) == 8 + 5
    assert model_rows_at_once(cfg("diffusers", 0)) == 8


def test_a_row_whose_key_raises_runs_alone():
    class KeyFails(Keyed):
        def batch_key(self, image):
            if image.shape[:2] == SIZES[3]:
                raise ValueError("no key for this one")
            return super().batch_key(image)

    plan = plan_for(4, 8)
    backend = KeyFails(plan.cfg.model)
    batcher = ModelBatcher(plan, backend)
    out = [b for batch in decoded_stream([[0, 3, 0], [3, 0, 0]], plan) for b in batcher.add(batch)] + batcher.flush()
    assert sorted(map(tuple, backend.calls)) == [(SIZES[0],) * 4, (SIZES[3],), (SIZES[3],)]
    assert all(e is None for b in out for e in b.column(b.schema.get_field_index(ERROR_COLUMN)).to_pylist())
