"""The catalog: forward table video -> SID, inverted index SID -> videos, prefix trie, popularity, hash."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onerec.config import save_json
from onerec.errors import UsageError
from onerec.tokenizer.trie import PrefixTrie

# Shapes legend: N items, L levels, K codes per level, U unique SIDs (= trie leaves), M queried videos.

FORMAT_VERSION = 1
NPZ_NAME = "catalog.npz"
JSON_NAME = "catalog.json"
TIE_BREAK = "popularity desc, then video id asc"
_BASE_ARRAYS = ("video_ids", "sids", "popularity")


@dataclass(frozen=True, eq=False)
class Catalog:
    """Every mapping between videos and semantic IDs that training, export and serving share.

    Items are rows 0..N-1 in ascending video id order. Several videos may share one SID (a collision);
    the inverted index lists a leaf's videos by the tie-break: popularity (training positive count)
    descending, then video id ascending. `popular_order` uses the same order over the whole catalog.
    Build with `Catalog.build` or `Catalog.load`; the derived fields are never set by hand."""

    video_ids: np.ndarray  # (N,) int64, ascending
    sids: np.ndarray  # (N, L) int32 forward table, row i = video_ids[i]
    popularity: np.ndarray  # (N,) int64 training positive counts
    num_codes: int  # K
    unique_sids: np.ndarray  # (U, L) int32, lexicographic = trie leaf order
    leaf_of_item: np.ndarray  # (N,) int64 leaf id of each item row
    inverted_offsets: np.ndarray  # (U+1,) int64
    inverted_items: np.ndarray  # (N,) int64 item rows; leaf u's rows = inverted_items[off[u]:off[u+1]]
    popular_order: np.ndarray  # (N,) int64 item rows by popularity desc, video id asc
    trie: PrefixTrie
    content_hash: str  # sha256 hex over video_ids, sids, popularity, num_codes

    @classmethod
    def build(
        cls, video_ids: np.ndarray, sids: np.ndarray, popularity: np.ndarray, num_codes: int
    ) -> Catalog:
        """Validate the base arrays (any row order), sort them by video id and derive everything else."""
        video_ids, sids, popularity = _validated(video_ids, sids, popularity, num_codes)
        order = np.argsort(video_ids, kind="stable")
        video_ids, sids, popularity = video_ids[order], sids[order], popularity[order]
        unique_sids, leaf_of_item = np.unique(sids, axis=0, return_inverse=True)
        leaf_of_item = leaf_of_item.reshape(-1).astype(np.int64)
        inverted_items = np.lexsort((video_ids, -popularity, leaf_of_item)).astype(np.int64)
        counts = np.bincount(leaf_of_item, minlength=unique_sids.shape[0])
        inverted_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(
            video_ids=video_ids,
            sids=sids,
            popularity=popularity,
            num_codes=int(num_codes),
            unique_sids=unique_sids.astype(np.int32),
            leaf_of_item=leaf_of_item,
            inverted_offsets=inverted_offsets,
            inverted_items=inverted_items,
            popular_order=np.lexsort((video_ids, -popularity)).astype(np.int64),
            trie=PrefixTrie.from_sids(unique_sids, num_codes),
            content_hash=content_hash(video_ids, sids, popularity, num_codes),
        )

    @property
    def levels(self) -> int:
        return int(self.sids.shape[1])

    @property
    def num_items(self) -> int:
        return int(self.video_ids.shape[0])

    @property
    def num_leaves(self) -> int:
        return int(self.unique_sids.shape[0])

    def rows_of(self, video_ids: Any) -> np.ndarray:
        """Item rows (M,) int64 of `video_ids`, -1 for videos not in the catalog."""
        query = _as_ids(video_ids)
        pos = np.minimum(np.searchsorted(self.video_ids, query), self.num_items - 1)
        return np.where(self.video_ids[pos] == query, pos, -1).astype(np.int64)

    def sids_of(self, video_ids: Any) -> np.ndarray:
        """SIDs (M, L) int64 of `video_ids`; rows of -1 for unknown videos."""
        rows = self.rows_of(video_ids)
        out = self.sids[np.maximum(rows, 0)].astype(np.int64)
        out[rows < 0] = -1
        return out

    def known_sids(self, video_ids: Any) -> np.ndarray:
        """SIDs (n, L) int64 of `video_ids` in order (history: most recent first), unknown videos dropped."""
        sids = self.sids_of(video_ids)
        return sids[sids[:, 0] >= 0]

    def leaves_of(self, video_ids: Any) -> np.ndarray:
        """Trie leaf ids (M,) int64 of `video_ids`, -1 for unknown videos."""
        rows = self.rows_of(video_ids)
        return np.where(rows >= 0, self.leaf_of_item[np.maximum(rows, 0)], -1).astype(np.int64)

    def videos_of_leaf(self, leaf: int) -> np.ndarray:
        """Video ids sharing leaf `leaf`'s SID, in tie-break order (popularity desc, video id asc)."""
        if not 0 <= leaf < self.num_leaves:
            raise ValueError(f"leaf {leaf} out of range [0, {self.num_leaves})")
        lo, hi = self.inverted_offsets[leaf], self.inverted_offsets[leaf + 1]
        return self.video_ids[self.inverted_items[lo:hi]]

    def new_items_beside(self, leaf: int) -> tuple[int, ...]:
        """Video ids (ascending) of the new items, popularity 0 (never a training positive, e.g. added by `onerec
        catalog add`), whose first L-1 codes equal leaf `leaf`'s (its own new videos included)."""
        return self._new_by_prefix.get(tuple(self.unique_sids[leaf, :-1].tolist()), ())

    @functools.cached_property
    def _new_by_prefix(self) -> dict[tuple[int, ...], tuple[int, ...]]:
        """(L-1)-prefix -> video ids (ascending) of its popularity-0 items; built once per catalog."""
        out: dict[tuple[int, ...], list[int]] = {}
        for row in np.flatnonzero(self.popularity == 0).tolist():  # rows ascend with video id
            out.setdefault(tuple(self.sids[row, :-1].tolist()), []).append(int(self.video_ids[row]))
        return {prefix: tuple(videos) for prefix, videos in out.items()}

    def most_popular(self, n: int, exclude: Any = None) -> np.ndarray:
        """The n most popular video ids (tie-break order), skipping the video ids in `exclude`."""
        if n < 0:
            raise ValueError(f"most_popular: n must be >= 0, got {n}")
        banned = np.unique(_as_ids(exclude))
        head = self.video_ids[self.popular_order[: n + banned.shape[0]]]  # enough even if all are banned
        return head[~np.isin(head, banned)][:n]

    def save(self, directory: Path) -> None:
        """Write catalog.npz (base arrays) and catalog.json (summary + hash), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (NPZ_NAME + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, video_ids=self.video_ids, sids=self.sids, popularity=self.popularity,
                     num_codes=np.array(self.num_codes, dtype=np.int64))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(directory / NPZ_NAME)
        save_json(directory / JSON_NAME, self.summary())

    def summary(self) -> dict[str, Any]:
        """What catalog.json holds."""
        return {
            "format_version": FORMAT_VERSION,
            "levels": self.levels,
            "num_codes": self.num_codes,
            "num_items": self.num_items,
            "num_sids": self.num_leaves,
            "content_hash": self.content_hash,
            "tie_break": TIE_BREAK,
        }

    @classmethod
    def load(cls, directory: Path) -> Catalog:
        """Read a saved catalog, rebuilding the derived fields; UsageError naming the file on any problem."""
        directory = Path(directory)
        meta = _read_json(directory / JSON_NAME)
        arrays = _read_npz(directory / NPZ_NAME)
        try:
            catalog = cls.build(arrays["video_ids"], arrays["sids"], arrays["popularity"], int(arrays["num_codes"]))
        except (ValueError, TypeError) as err:
            raise UsageError(f"{directory / NPZ_NAME}: invalid catalog ({err})") from err
        if catalog.summary() != meta:
            raise UsageError(
                f"{directory / JSON_NAME}: does not match {NPZ_NAME} (content hash or summary differs)"
            )
        return catalog

    @staticmethod
    def read_hash(directory: Path) -> str:
        """The content hash from catalog.json alone (no arrays loaded); UsageError naming the file."""
        path = Path(directory) / JSON_NAME
        meta = _read_json(path)
        if not isinstance(meta.get("content_hash"), str):
            raise UsageError(f"{path}: catalog summary has no content_hash")
        return meta["content_hash"]


def content_hash(video_ids: np.ndarray, sids: np.ndarray, popularity: np.ndarray, num_codes: int) -> str:
    """sha256 hex over the base arrays (canonical little-endian int64, shapes included) and K."""
    h = hashlib.sha256(f"onerec-catalog-v{FORMAT_VERSION};K={int(num_codes)}".encode())
    for name, arr in zip(_BASE_ARRAYS, (video_ids, sids, popularity), strict=True):
        canon = np.ascontiguousarray(arr, dtype="<i8")
        h.update(f";{name}{canon.shape}".encode())
        h.update(canon.tobytes())
    return h.hexdigest()


def _as_ids(videos: Any) -> np.ndarray:
    """Video ids (M,) int64 from None, an array, a list or any iterable (a set of ids, say)."""
    if videos is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(videos, np.ndarray | list | tuple):
        return np.asarray(videos, dtype=np.int64).reshape(-1)
    return np.fromiter(videos, dtype=np.int64)


def _validated(
    video_ids: np.ndarray, sids: np.ndarray, popularity: np.ndarray, num_codes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The base arrays as int64 / int32 / int64, or ValueError naming what is wrong."""
    video_ids, sids, popularity = np.asarray(video_ids), np.asarray(sids), np.asarray(popularity)
    for name, arr in zip(_BASE_ARRAYS, (video_ids, sids, popularity), strict=True):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"catalog: {name} must be integers, got {arr.dtype}")
    if video_ids.ndim != 1 or video_ids.shape[0] == 0:
        raise ValueError(f"catalog: video_ids must be a non-empty (N,) array, got shape {video_ids.shape}")
    n = video_ids.shape[0]
    if sids.ndim != 2 or sids.shape[0] != n or sids.shape[1] == 0:
        raise ValueError(f"catalog: sids must be ({n}, L) with L >= 1, got shape {sids.shape}")
    if popularity.shape != (n,):
        raise ValueError(f"catalog: popularity must be ({n},), got shape {popularity.shape}")
    if num_codes < 1 or sids.min() < 0 or sids.max() >= num_codes:
        raise ValueError(f"catalog: SIDs must lie in [0, {num_codes})")
    if popularity.min() < 0:
        raise ValueError("catalog: popularity counts must be >= 0")
    if np.unique(video_ids).shape[0] != n:
        raise ValueError("catalog: duplicate video ids")
    return video_ids.astype(np.int64), sids.astype(np.int32), popularity.astype(np.int64)


def _read_json(path: Path) -> dict[str, Any]:
    """catalog.json as a dict, or UsageError naming it."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UsageError(f"{path}: catalog file is missing") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: unreadable catalog summary ({err})") from err
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: catalog summary must be a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The base arrays of catalog.npz (never unpickled), or UsageError naming it."""
    if not path.exists():
        raise UsageError(f"{path}: catalog file is missing")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in (*_BASE_ARRAYS, "num_codes")}
    except Exception as err:  # zipfile, zlib, format and key errors all mean a corrupt file
        raise UsageError(f"{path}: corrupt or incomplete catalog arrays ({type(err).__name__}: {err})") from err

