"""Interactions: dtype coercion, selection and atomic .npz round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onerec.data.interactions import Interactions
from onerec.errors import UsageError


def _small() -> Interactions:
    return Interactions(
        users=[1, 1, 2], items=[10, 11, 10], ratings=[5, 3.5, 4], timestamps=[100, 101, 50]
    )


def test_columns_are_coerced_to_documented_dtypes() -> None:
    x = _small()
    assert len(x) == 3
    assert x.users.dtype == np.int64 and x.items.dtype == np.int64
    assert x.ratings.dtype == np.float32 and x.timestamps.dtype == np.int64
    np.testing.assert_array_equal(x.ratings, np.array([5.0, 3.5, 4.0], dtype=np.float32))


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="one length"):
        Interactions(users=[1, 2], items=[1], ratings=[1.0], timestamps=[1])


def test_positives_keeps_rows_at_or_above_threshold_in_order() -> None:
    pos = _small().positives(4.0)
    np.testing.assert_array_equal(pos.users, [1, 2])
    np.testing.assert_array_equal(pos.items, [10, 10])
    np.testing.assert_array_equal(pos.timestamps, [100, 50])


def test_save_load_round_trip_leaves_no_tmp_file(tmp_path: Path) -> None:
    x = _small()
    path = tmp_path / "interactions.npz"
    x.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions.npz"]
    y = Interactions.load(path)
    for name in ("users", "items", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(y, name), getattr(x, name))
        assert getattr(y, name).dtype == getattr(x, name).dtype


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope.npz"):
        Interactions.load(tmp_path / "nope.npz")


def test_load_corrupt_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(UsageError, match="bad.npz"):
        Interactions.load(path)


def test_load_npz_without_the_arrays_names_it(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, something=np.arange(3))
    with pytest.raises(UsageError, match="other.npz.*missing"):
        Interactions.load(path)
