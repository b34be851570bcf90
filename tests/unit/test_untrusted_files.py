"""Untrusted scan files: property-based (hypothesis) fuzzing of the loaders, which never
fail with anything but ScanFileError."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptycho.data import Scan, ScanFileError, load_scan
from tests.conftest import write_npz


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".npz", ".h5", ".hdf5", ".cxi"]))
def test_arbitrary_bytes_only_raise_scan_file_error(tmp_path, data, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(data)
    with pytest.raises(ScanFileError):
        load_scan(path)


array_strategy = hnp.arrays(
    dtype=st.one_of(
        hnp.floating_dtypes(),
        hnp.integer_dtypes(),
        hnp.complex_number_dtypes(),
        hnp.boolean_dtypes(),
        hnp.unicode_string_dtypes(max_len=3),
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=20),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arrays=st.dictionaries(
        st.sampled_from(
            [
                "diff3d",
                "diffraction",
                "probeGuess",
                "xcoords",
                "ycoords",
                "objectGuess",
                "scan_index",
                "nphotons",
                "other",
            ]
        ),
        array_strategy,
        max_size=7,
    )
)
def test_arbitrary_npz_arrays_give_a_scan_or_scan_file_error(tmp_path, arrays):
    path = write_npz(tmp_path / "arrays.npz", **arrays)
    try:
        scan = load_scan(path)
    except ScanFileError:
        return
    assert isinstance(scan, Scan)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arrays=st.dictionaries(
        st.sampled_from(["diff3d", "probeGuess", "xcoords", "ycoords", "objectGuess"]),
        array_strategy,
        max_size=5,
    )
)
def test_arbitrary_h5_datasets_give_a_scan_or_scan_file_error(tmp_path, arrays):
    path = tmp_path / "arrays.h5"
    with h5py.File(path, "w") as handle:
        for key, value in arrays.items():
            if value.dtype.kind == "U":
                value = np.char.encode(value, "utf-8")
            handle[key] = value
    try:
        scan = load_scan(path)
    except ScanFileError:
        return
    assert isinstance(scan, Scan)
