"""``assemble``'s plain-Python rows for a few transactions equal its numpy rows bit for bit,
for any amounts, times and entity features (NaN and infinities included), without servers."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.features import definitions as d
from workers.records import EVENT_TIME_MAX_US, EVENT_TIME_MIN_US

FLOAT32 = st.floats(width=32)
ROW = st.tuples(
    st.one_of(st.floats(0, 1e9), st.floats(allow_nan=False)),
    st.one_of(st.integers(EVENT_TIME_MIN_US, EVENT_TIME_MAX_US), st.integers(-(2**63), 2**63 - 1)),
    st.lists(
        st.one_of(FLOAT32, st.integers(0, 50).map(float)),
        min_size=len(d.CUSTOMER_FEATURES),
        max_size=len(d.CUSTOMER_FEATURES),
    ),
    st.lists(FLOAT32, min_size=len(d.TERMINAL_FEATURES), max_size=len(d.TERMINAL_FEATURES)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ROW, min_size=1, max_size=d.FEW_ROWS))
def test_few_rows_assemble_as_numpy_does(rows) -> None:
    amount = np.array([r[0] for r in rows], dtype=np.float64)
    at = np.array([r[1] for r in rows], dtype=np.int64)
    customer = np.array([r[2] for r in rows], dtype=np.float32)
    terminal = np.array([r[3] for r in rows], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow to inf in the float32 cast, on both paths
        few = d._assemble_few(amount, at, customer, terminal)
        many = d._assemble_many(amount, at, customer, terminal)
        dispatched = d.assemble(amount, at, customer, terminal)
    assert few.dtype == many.dtype == np.float32 and few.shape == many.shape == (len(rows), d.N_FEATURES)
    assert few.tobytes() == many.tobytes()
    assert dispatched.tobytes() == many.tobytes()
