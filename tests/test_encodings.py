"""The array storage column: built from numpy in one copy, read back as views, equal to the per-cell encoding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vb_batch.io.encodings import ARRAY_TYPE, arrays_to_column, column_to_arrays, decode_array, encode_array

DTYPES = st.sampled_from(["<f4", ">f4", "<f8", "|u1", "<u2", ">i4", "|b1"])
CELL = st.one_of(
    st.none(),
    DTYPES.flatmap(lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=1, max_dims=3, min_side=0))),
)


def per_cell(arrays):
    """The encoding one cell at a time (what the column was before; the output `array` encoding still is)."""
    return pa.array([None if a is None else encode_array(a) for a in arrays], type=ARRAY_TYPE)


@settings(max_examples=200, deadline=None)
@given(st.lists(CELL, max_size=8), st.data())
def test_column_equals_the_per_cell_encoding_and_reads_back_sliced_or_chunked(arrays, data):
    column = arrays_to_column(arrays)
    assert column.type == ARRAY_TYPE and column.equals(per_cell(arrays))
    for cells in (column_to_arrays(column), column_to_arrays(per_cell(arrays))):
        assert len(cells) == len(arrays)
        for original, back in zip(arrays, cells):
            if original is None:
                assert back is None
            else:  # the values, little-endian, as decode_array gives them
                assert back.shape == original.shape and back.dtype == original.dtype.newbyteorder("<")
                np.testing.assert_array_equal(back, original)
    start = data.draw(st.integers(0, len(arrays)))
    stop = data.draw(st.integers(start, len(arrays)))
    sliced = column_to_arrays(column.slice(start, stop - start))
    chunked = column_to_arrays(pa.chunked_array([column.slice(0, start), column.slice(start)], type=ARRAY_TYPE))
    for got, want in ((sliced, arrays[start:stop]), (chunked, arrays)):
        assert [None if g is None else g.tobytes() for g in got] == [
            None if w is None else np.ascontiguousarray(w).astype(w.dtype.newbyteorder("<")).tobytes() for w in want
        ]


def test_empty_columns():
    assert column_to_arrays(arrays_to_column([])) == []
    assert column_to_arrays(pa.array([], type=ARRAY_TYPE)) == []
    assert column_to_arrays(pa.chunked_array([], type=ARRAY_TYPE)) == []
    assert column_to_arrays(arrays_to_column([None, None])) == [None, None]


def test_cells_are_read_only_views_and_unaligned_ones_are_copied():
    column = arrays_to_column([np.arange(3, dtype=np.uint8), np.arange(4, dtype=np.float32)])
    small, floats = column_to_arrays(column)
    assert not small.flags.writeable and not floats.flags.writeable
    # The float cell starts 3 bytes into the data buffer: unaligned, so it is copied (aligned, same values).
    assert floats.flags.aligned and floats.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert decode_array(per_cell([np.arange(4, dtype=np.float32)])[0].as_py()).tolist() == floats.tolist()
