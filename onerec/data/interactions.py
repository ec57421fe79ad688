"""The `Interactions` table (user, video, rating, timestamp) and atomic .npz storage shared by data files."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onerec.errors import UsageError


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to one .npz at `path` via a tmp file + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object stops np.savez from appending ".npz" to the tmp name
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_npz(path: Path, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """Read `keys` from the .npz at `path` (never unpickling); UsageError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: {what} file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise UsageError(f"{path}: not a {what} file (missing arrays {missing})")
            return {k: npz[k] for k in keys}
    except UsageError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path}: cannot read {what} file ({exc})") from exc


def item_rows(video_ids: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(E,) int64 row of each of `items` in `video_ids` (any order), -1 where the item is not listed."""
    video_ids, items = np.asarray(video_ids, dtype=np.int64), np.asarray(items, dtype=np.int64)
    if len(video_ids) == 0:
        return np.full(len(items), -1, dtype=np.int64)
    order = np.argsort(video_ids, kind="stable")
    sorted_ids = video_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, items), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == items, order[pos], -1).astype(np.int64)


@dataclass(frozen=True)
class Interactions:
    """E interaction events; arrays are coerced to the documented dtypes and must share one length."""

    users: np.ndarray  # (E,) int64 user ids
    items: np.ndarray  # (E,) int64 video ids
    ratings: np.ndarray  # (E,) float32
    timestamps: np.ndarray  # (E,) int64

    def __post_init__(self) -> None:
        columns = {
            "users": np.asarray(self.users, dtype=np.int64),
            "items": np.asarray(self.items, dtype=np.int64),
            "ratings": np.asarray(self.ratings, dtype=np.float32),
            "timestamps": np.asarray(self.timestamps, dtype=np.int64),
        }
        lengths = {name: a.shape for name, a in columns.items()}
        if any(a.ndim != 1 for a in columns.values()) or len({a.shape[0] for a in columns.values()}) != 1:
            raise ValueError(f"Interactions: columns must be 1-D of one length, got shapes {lengths}")
        for name, array in columns.items():
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def select(self, index: np.ndarray) -> Interactions:
        """The rows picked by a boolean mask (E,) or an integer index array, in that order."""
        return Interactions(self.users[index], self.items[index], self.ratings[index], self.timestamps[index])

    def positives(self, threshold: float) -> Interactions:
        """Only the rows with rating >= `threshold`, in their original order."""
        return self.select(self.ratings >= threshold)

    def save(self, path: Path) -> None:
        """Write one .npz atomically (tmp + rename)."""
        save_npz_atomic(path, {
            "users": self.users, "items": self.items, "ratings": self.ratings, "timestamps": self.timestamps,
        })

    @classmethod
    def load(cls, path: Path) -> Interactions:
        """Read a file written by `save`; UsageError naming the file if it is missing or corrupt."""
        arrays = load_npz(path, ("users", "items", "ratings", "timestamps"), "interactions")
        try:
            return cls(**arrays)
        except ValueError as exc:
            raise UsageError(f"{path}: corrupt interactions file ({exc})") from exc
