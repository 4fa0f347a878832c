"""No exception of one row escapes a stage: random bytes, random URIs and random model answers through the real stages."""

from __future__ import annotations

import socket

import numpy as np
import pyarrow as pa
import pytest
from conftest import png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vb_batch.codecs import depth
from vb_batch.config import load_config
from vb_batch.io import fetch
from vb_batch.models.identity import IdentityBackend
from vb_batch.stages import ERROR_COLUMN, IMAGE_COLUMN, Plan, decode_encode, fetch_decode, run_model

GOOD = png_bytes(depth.encode(np.linspace(1, 20, 16 * 16, dtype=np.float32).reshape(16, 16)))
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan_for(column: str, tmp_path) -> Plan:
    inputs = {"path": str(tmp_path), "min_side": 4, "max_bytes": 100_000, "storage": {"timeout_s": 1}}
    if column == "uri":
        inputs.update(uri_column="uri", allowed_prefixes=[str(tmp_path), "http://", "https://", "s3://"])
    cfg = load_config({"input": inputs, "tasks": ["depth", "normals"], "model": {"backend": "identity"}})
    schema = pa.schema([pa.field("id", pa.int64()), pa.field(column, pa.binary() if column == "image" else pa.string())])
    return Plan.build(cfg, schema, image_column="image" if column == "image" else None,
                      uri_column="uri" if column == "uri" else None)


def check_every_row_is_an_image_or_an_error(batch: pa.RecordBatch, rows: int) -> None:
    assert batch.num_rows == rows
    images = batch.column(batch.schema.get_field_index(IMAGE_COLUMN)).to_pylist()
    errors = batch.column(batch.schema.get_field_index(ERROR_COLUMN)).to_pylist()
    for image, error in zip(images, errors):
        assert (image is None) == (error is not None)
        assert error is None or (error["code"] and isinstance(error["message"], str))


def mutated(data: bytes, cuts: list[int], flips: list[int]) -> bytes:
    out = bytearray(data)
    for position in flips:
        out[position % len(out)] ^= 0xFF
    for cut in cuts:
        out = out[: cut % (len(out) + 1)]
    return bytes(out)


image_cells = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.builds(mutated, st.just(GOOD), st.lists(st.integers(0, 10**6), max_size=1), st.lists(st.integers(0, 10**6), max_size=4)),
    st.just(GOOD),
)


@pytest.fixture(scope="module")
def image_plan(tmp_path_factory):
    return plan_for("image", tmp_path_factory.mktemp("img"))


@pytest.fixture(scope="module")
def uri_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uri")
    (folder / "good.png").write_bytes(GOOD)
    with pytest.MonkeyPatch.context() as mp:
        # No DNS in a property test: every generated host name fails to resolve, as an unknown one would.
        mp.setattr(fetch, "resolve", lambda host, port: (_ for _ in ()).throw(socket.gaierror(-2, "not resolved")))
        yield plan_for("uri", folder)


@SETTINGS
@given(cells=st.lists(image_cells, min_size=1, max_size=6))
def test_fetch_decode_turns_any_bytes_into_an_image_or_a_row_error(image_plan, cells):
    batch = pa.record_batch({"id": list(range(len(cells))), "image": pa.array(cells, pa.binary())})
    check_every_row_is_an_image_or_an_error(fetch_decode(batch, image_plan), len(cells))


uri_cells = st.one_of(
    st.none(),
    st.text(max_size=60),
    st.builds(lambda scheme, rest: f"{scheme}{rest}", st.sampled_from(["http://", "https://", "s3://", "file:", "file://",
                                                                      "local:", "/", "S3://", "ftp://", "data:"]),
              st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)),
)


@SETTINGS
@given(cells=st.lists(uri_cells, min_size=1, max_size=4))
def test_fetch_decode_turns_any_uri_into_an_image_or_a_row_error(uri_plan, cells):
    cells = [c if c is None else c.encode("utf-8", "replace").decode("utf-8") for c in cells]
    batch = pa.record_batch({"id": list(range(len(cells))), "uri": pa.array(cells, pa.string())})
    check_every_row_is_an_image_or_an_error(fetch_decode(batch, uri_plan), len(cells))


class Erratic(IdentityBackend):
    """Answers each image with whatever `answers` holds next: arrays of odd shapes and types, objects, errors."""

    def __init__(self, answers):
        self.answers = answers

    def predict(self, images, prompts, task, seeds):
        return [self.answers[i % len(self.answers)] for i in range(len(images))]


answers = st.one_of(
    st.builds(lambda h, w, c: np.zeros((h, w, c), np.uint8), st.integers(0, 20), st.integers(0, 20), st.integers(1, 5)),
    st.builds(lambda n: np.full((n,), 7, np.uint8), st.integers(0, 10)),
    st.sampled_from([None, "painting", {"image": 1}, 3.5, np.array([["a", "b"]]),
                     np.full((8, 8, 3), np.nan, np.float32), np.full((8, 8, 3), 300, np.int64)]),
)


@SETTINGS
@given(model_answers=st.lists(answers, min_size=1, max_size=4))
def test_any_model_answer_becomes_outputs_or_a_row_error(image_plan, model_answers):
    batch = pa.record_batch({"id": [0, 1, 2], "image": pa.array([GOOD, GOOD, b"junk"], pa.binary())})
    answered = run_model(fetch_decode(batch, image_plan), image_plan, Erratic(model_answers))
    out = decode_encode(answered, image_plan)
    assert out.num_rows == 3
    errors = out.column(out.schema.get_field_index(ERROR_COLUMN)).to_pylist()
    depths = out.column(out.schema.get_field_index("depth")).to_pylist()
    assert errors[2]["code"] == "not_image"
    for error, value in zip(errors, depths):
        assert (error is None) == (value is not None)
