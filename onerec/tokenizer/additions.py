"""New items without retraining (`onerec catalog add`): content -> tokenizer embedding, trained codebooks -> SIDs.

Legend: N catalog items, B base items (the ones `tokenize` clustered, rows of RUN/embeddings.npy), M new items,
W warm items (base items with content features and a non-zero embedding), F content features, d embedding dim,
L levels, K codes per level.

The design (README "catalog add"):
- **Embedding.** An items file either gives each new item a vector in the tokenizer's space (width d of
  RUN/embeddings.npy, e.g. a run tokenized with `--embeddings` from a content model), or content features (MovieLens
  genres and release year from `u.item`, Amazon attribute ids from `*_item2attributes.json`, or JSON lines). Features
  are mapped to the collaborative space by ridge regression fitted on the warm items: binary features -> their
  RUN/embeddings.npy rows, lambda chosen on a seeded 10% of them by mean cosine. A prediction is scaled to the
  median norm of the warm embeddings, because nearest-centroid search on a shrunken vector (a ridge prediction is
  an average) would send every new item to the centroid of smallest norm.
- **Codebooks.** `tokenize` keeps only the SIDs, so the codebooks are recovered from the catalog and
  RUN/embeddings.npy: level l's centroid of code c is the mean residual of the base items holding c at level l. That
  is exactly what balanced k-means returns (its centroids are the means of its assignment) wherever the unique-SID
  pass moved no item, i.e. every level for `--no-unique` and level 0 otherwise; on the last two levels it is the
  centre of the items that hold the code in the catalog. They are recovered once and kept in
  RUN/catalog/codebooks.npz, so later additions reuse them.
- **SIDs.** Residual nearest centroid per level, existing SIDs never change: at each level the nearest code whose
  prefix still has a free leaf (at most K^(L-l-1) items under a depth-(l+1) prefix), and at the last level the
  nearest code not taken under the prefix (the disambiguation that keeps SIDs unique, as `onerec.tokenizer.unique`
  does at tokenize time). `placement="random"` (the cold-start study's control) draws a uniformly random free SID.
- **Writing.** The new catalog (new items with popularity 0) is staged beside RUN/catalog and swapped in with one
  atomic exchange (renameat2 RENAME_EXCHANGE; two renames where the kernel lacks it); the replaced catalog is kept in
  RUN/catalogs/<hash>. The live repository is not touched: `onerec deploy --run RUN` serves the new catalog as the
  next version, sharing the ONNX weights. RUN/catalog/additions.json records the lineage (the tokenized catalog's
  hash, every addition), which `extends` reads: the model trained on an earlier catalog of the chain still fits.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from onerec.config import save_json
from onerec.data.attributes import feature_matrix, read_item_attributes, read_movielens_items
from onerec.errors import UsageError
from onerec.runs import RunDir, advisory_lock
from onerec.tokenizer.catalog import Catalog

log = logging.getLogger(__name__)

CODEBOOKS_FILE = "codebooks.npz"
LINEAGE_FILE = "additions.json"
ARCHIVE_DIR = "catalogs"  # RUN/catalogs/<content hash[:16]>: catalogs replaced by `catalog add`
FORMATS = ("auto", "npz", "jsonl", "movielens", "attributes")
PLACEMENTS = ("codebook", "random")
MIN_WARM_ITEMS = 10  # fewer warm items with content than this: no map can be fitted


@dataclass(frozen=True)
class AddConfig:
    """How `add_items` reads the items file and places the new items."""

    format: str = "auto"  # auto (by file name) | npz | jsonl | movielens (u.item) | attributes (*_item2attributes)
    placement: str = "codebook"  # codebook: residual nearest centroid + free last code; random: a random free SID
    # above the last level, prefer the codes that extend a prefix the catalog has (the model was trained on); random:
    # a random free leaf under a random known (L-1)-prefix instead of a uniformly random free SID
    known_prefixes: bool = True
    seed: int = 0  # the ridge validation split and random placement
    ridge_lambdas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)  # candidates, the best validation cosine wins
    validation_share: float = 0.1  # of the warm items, to choose lambda (then refitted on all)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format: unknown format {self.format!r}; use {', '.join(FORMATS)}")
        if self.placement not in PLACEMENTS:
            raise UsageError(f"--placement: unknown placement {self.placement!r}; use {', '.join(PLACEMENTS)}")


# --- codebooks --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codebooks:
    """The residual codebooks of a catalog and the base items they were recovered from."""

    centroids: np.ndarray  # (L, K, d) float64; level l's code c; zero rows for codes no base item holds
    used: np.ndarray  # (L, K) bool: some base item holds code c at level l
    base_video_ids: np.ndarray  # (B,) int64, ascending: the rows of RUN/embeddings.npy

    @property
    def levels(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def num_codes(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[2])

    @classmethod
    def recover(cls, sids: np.ndarray, embeddings: np.ndarray, num_codes: int,
                base_video_ids: np.ndarray) -> Codebooks:
        """Level by level: centroid (l, c) = the mean residual of the items holding code c at level l, where the
        residual of level l is the embedding minus the item's centroids of levels < l. sids (B, L), embeddings
        (B, d)."""
        sids = np.asarray(sids, dtype=np.int64)
        residual = np.asarray(embeddings, dtype=np.float64).copy()  # (B, d)
        levels, dim = sids.shape[1], residual.shape[1]
        centroids = np.zeros((levels, num_codes, dim))
        used = np.zeros((levels, num_codes), dtype=bool)
        for level in range(levels):
            codes = sids[:, level]
            counts = np.bincount(codes, minlength=num_codes)  # (K,)
            sums = np.zeros((num_codes, dim))
            np.add.at(sums, codes, residual)
            used[level] = counts > 0
            centroids[level, used[level]] = sums[used[level]] / counts[used[level], None]
            residual -= centroids[level, codes]
        return cls(centroids=centroids, used=used, base_video_ids=np.asarray(base_video_ids, dtype=np.int64))

    def save(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, centroids=self.centroids, used=self.used, base_video_ids=self.base_video_ids)

    @classmethod
    def load(cls, path: Path) -> Codebooks:
        """UsageError naming the file when it is missing or not a codebooks file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                books = cls(centroids=data["centroids"].astype(np.float64), used=data["used"].astype(bool),
                            base_video_ids=data["base_video_ids"].astype(np.int64))
        except Exception as err:  # zip, format and key errors all mean a corrupt file
            raise UsageError(f"{path}: corrupt codebooks ({type(err).__name__}: {err})") from err
        if books.centroids.ndim != 3 or books.used.shape != books.centroids.shape[:2]:
            raise UsageError(f"{path}: codebooks have inconsistent shapes")
        return books


# --- placement --------------------------------------------------------------------------------------------


class FreeLeaves:
    """Which SIDs are taken and how many leaves each prefix still has room for (K^(L-depth) leaves under it)."""

    def __init__(self, taken: np.ndarray, num_codes: int) -> None:
        taken = np.asarray(taken, dtype=np.int64)
        self.num_codes = num_codes
        self.levels = int(taken.shape[1])
        self.taken = {tuple(row) for row in taken.tolist()}
        self.under: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.levels)]  # depth -> prefix -> leaves
        for sid in self.taken:
            self._count(sid)

    def _count(self, sid: tuple[int, ...]) -> None:
        for depth in range(1, self.levels):
            prefix = sid[:depth]
            self.under[depth][prefix] = self.under[depth].get(prefix, 0) + 1

    def has_room(self, prefix: tuple[int, ...]) -> bool:
        """Whether some SID starting with `prefix` (1 <= len <= L) is free."""
        depth = len(prefix)
        if depth == self.levels:
            return prefix not in self.taken
        return self.under[depth].get(prefix, 0) < self.num_codes ** (self.levels - depth)

    def take(self, sid: tuple[int, ...]) -> None:
        if sid in self.taken:
            raise ValueError(f"SID {sid} is taken")
        self.taken.add(sid)
        self._count(sid)

    @property
    def free(self) -> int:
        return self.num_codes**self.levels - len(self.taken)


def nearest_sids(codebooks: Codebooks, vectors: np.ndarray, taken: np.ndarray, progress: bool = False,
                 known_prefixes: bool = True) -> np.ndarray:
    """SIDs (M, L) int32 for `vectors` (M, d), in order, none of them in `taken` (U, L) nor shared: residual nearest
    centroid per level among the codes whose prefix still has a free leaf (codes no base item holds come last).
    With `known_prefixes`, above the last level the codes that extend a prefix some item of `taken` has come first:
    the model never generates a prefix it was not trained on, so a new item under one can be reached neither by
    beam search nor by matching a generated SID's prefix (docs: the cold-start study)."""
    free = FreeLeaves(taken, codebooks.num_codes)
    known = [{tuple(p) for p in np.asarray(taken)[:, :depth].tolist()} for depth in range(codebooks.levels)]
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) > free.free:
        raise UsageError(f"--items: {len(vectors)} new items but only {free.free} free SIDs (K^L = "
                         f"{codebooks.num_codes}^{codebooks.levels}); the catalog needs more codes")
    out = np.zeros((len(vectors), codebooks.levels), dtype=np.int32)
    for i in tqdm(range(len(vectors)), desc="catalog add", unit="item", disable=not progress):
        residual = vectors[i]
        prefix: tuple[int, ...] = ()
        for level in range(codebooks.levels):
            dist = ((codebooks.centroids[level] - residual) ** 2).sum(1)  # (K,)
            keys = [dist, ~codebooks.used[level]]  # lexsort: the last key sorts first
            if known_prefixes and level < codebooks.levels - 1:
                keys.append(np.array([(*prefix, c) not in known[level + 1] for c in range(codebooks.num_codes)]))
            order = np.lexsort(keys)  # (known prefixes first,) held codes first, each group nearest first
            code = next(int(c) for c in order if free.has_room((*prefix, int(c))))
            prefix = (*prefix, code)
            residual = residual - codebooks.centroids[level, code]
        free.take(prefix)
        out[i] = prefix
    return out


def random_sids(num_codes: int, levels: int, count: int, taken: np.ndarray, rng: np.random.Generator,
                max_tries: int = 1000, known_prefixes: bool = False) -> np.ndarray:
    """`count` distinct SIDs (count, L) int32 drawn uniformly from the SIDs not in `taken` (rejection sampling); with
    `known_prefixes`, a uniformly drawn (L-1)-prefix of `taken` with a free leaf, then a free last code under it
    (uniformly from all free SIDs once every such prefix is full)."""
    free = FreeLeaves(taken, num_codes)
    if count > free.free:
        raise UsageError(f"--items: {count} new items but only {free.free} free SIDs")
    prefixes = sorted({tuple(p) for p in np.asarray(taken)[:, :-1].tolist()})
    out = np.zeros((count, levels), dtype=np.int32)
    for i in range(count):
        open_prefixes = [p for p in prefixes if free.has_room(p)] if known_prefixes else []
        for _ in range(max_tries):
            if open_prefixes:  # else (every known prefix full) a uniformly random free SID
                sid = (*open_prefixes[int(rng.integers(len(open_prefixes)))], int(rng.integers(num_codes)))
            else:
                sid = tuple(int(c) for c in rng.integers(0, num_codes, size=levels))
            if sid not in free.taken:
                break
        else:
            raise UsageError(f"--placement random: no free SID found in {max_tries} draws (catalog nearly full)")
        free.take(sid)
        out[i] = sid
    return out


# --- content -> embedding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentMap:
    """Ridge regression from binary content features to the tokenizer's embeddings, with an intercept."""

    weights: np.ndarray  # (F, d)
    intercept: np.ndarray  # (d,)
    norm: float  # predictions are scaled to this length (the warm embeddings' median norm)
    lam: float
    report: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def _solve(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        mean_x, mean_y = x.mean(0), y.mean(0)
        xc, yc = x - mean_x, y - mean_y
        weights = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)  # (F, d)
        return weights, mean_y - mean_x @ weights

    @classmethod
    def fit(cls, features: sp.csr_matrix, targets: np.ndarray, cfg: AddConfig) -> ContentMap:
        """Fit on W warm items: features (W, F) binary, targets (W, d); lambda by mean cosine on a seeded
        `cfg.validation_share` of them (refitted on all). report: lambda, validation cosine of the map and of the
        intercept alone (the mean embedding: what content adds over it), warm items, features."""
        x = np.asarray(features.todense(), dtype=np.float64)  # (W, F)
        y = np.asarray(targets, dtype=np.float64)  # (W, d)
        norm = float(np.median(np.linalg.norm(y, axis=1)))
        report: dict[str, Any] = {"warm_items": int(x.shape[0]), "features": int(x.shape[1])}
        lam = cfg.ridge_lambdas[0]
        n_val = int(round(cfg.validation_share * len(x)))
        if len(cfg.ridge_lambdas) > 1 and n_val >= 2 and len(x) - n_val >= 2:
            perm = np.random.default_rng(cfg.seed).permutation(len(x))
            val, fit = perm[:n_val], perm[n_val:]
            scores = {}
            for candidate in cfg.ridge_lambdas:
                w, b = cls._solve(x[fit], y[fit], candidate)
                scores[candidate] = _mean_cosine(x[val] @ w + b, y[val])
            lam = max(scores, key=lambda c: (scores[c], -c))  # ties: the smaller lambda
            report |= {"validation_items": int(n_val), "validation_cosine": scores[lam],
                       "validation_cosine_mean_embedding": _mean_cosine(np.tile(y[fit].mean(0), (n_val, 1)), y[val]),
                       "validation_cosine_by_lambda": {str(c): s for c, s in scores.items()}}
        lam = float(lam)
        weights, intercept = cls._solve(x, y, lam)
        return cls(weights=weights, intercept=intercept, norm=norm, lam=lam, report={"lambda": lam, **report})

    def predict(self, features: sp.csr_matrix) -> np.ndarray:
        """(M, d) float32 embeddings of `features` (M, F), each scaled to `norm`."""
        y = np.asarray(features @ self.weights) + self.intercept  # (M, d)
        length = np.linalg.norm(y, axis=1, keepdims=True)
        return (y * (self.norm / np.where(length > 0, length, 1.0))).astype(np.float32)


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    return float(((a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok])).mean()) if ok.any() else 0.0


# --- the items file ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemsFile:
    """What an items file says about its items: an embedding each, or content features each."""

    path: Path
    format: str  # npz | jsonl | movielens | attributes
    video_ids: np.ndarray  # (M,) int64, ascending, distinct
    embeddings: np.ndarray | None = None  # (M, d) float32 for embedding files
    content: dict[int, list[str]] | None = None  # video id -> features for feature files


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name == "u.item" or name.endswith(".item"):
        return "movielens"
    if name.endswith(".json"):
        return "attributes"
    raise UsageError(f"{path}: unknown items file type; name it *.npz, *.jsonl, u.item or *_item2attributes.json, "
                     "or pass --format")


def read_items(path: Path, fmt: str = "auto") -> ItemsFile:
    """Read an items file (see `AddConfig.format`); UsageError naming the file (and line) for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: items file not found")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "npz":
        return _read_npz(path)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "movielens":
        content = read_movielens_items(path)
    else:
        content = {video: [f"attr:{a}" for a in values] for video, values in read_item_attributes(path).items()}
    if not content:
        raise UsageError(f"{path}: no items")
    return ItemsFile(path, fmt, np.array(sorted(content), dtype=np.int64), content=content)


def _read_npz(path: Path) -> ItemsFile:
    try:
        with np.load(path, allow_pickle=False) as data:
            video_ids, embeddings = data["video_ids"], data["embeddings"]
    except Exception as err:  # zip, format and missing-key errors
        raise UsageError(f"{path}: not an items .npz with arrays video_ids (M,) and embeddings (M, d) "
                         f"({type(err).__name__}: {err})") from err
    if video_ids.ndim != 1 or not np.issubdtype(video_ids.dtype, np.integer):
        raise UsageError(f"{path}: video_ids must be a 1-D integer array, got {video_ids.dtype} {video_ids.shape}")
    if embeddings.ndim != 2 or embeddings.shape[0] != video_ids.shape[0] or embeddings.dtype.kind not in "fiu":
        raise UsageError(f"{path}: embeddings must be a real ({len(video_ids)}, d) array, got {embeddings.dtype} "
                         f"{embeddings.shape}")
    return _embedding_items(path, "npz", video_ids.astype(np.int64), embeddings)


def _read_jsonl(path: Path) -> ItemsFile:
    ids: list[int] = []
    vectors: list[list[float]] = []
    content: dict[int, list[str]] = {}
    kind = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read items ({err})") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UsageError(f"{where}: not JSON ({err})") from None
        video = row.get("video_id") if isinstance(row, dict) else None
        if not isinstance(video, int) or isinstance(video, bool) or video < 0:
            raise UsageError(f"{where}: each line needs \"video_id\": a non-negative integer")
        this = "embedding" if "embedding" in row else "attributes" if "attributes" in row else None
        if this is None or kind not in (None, this):
            raise UsageError(f"{where}: each line needs \"embedding\" or \"attributes\", the same key on every line")
        kind = this
        value = row[this]
        if not isinstance(value, list) or not value and this == "embedding":
            raise UsageError(f"{where}: \"{this}\" must be a list")
        if this == "embedding":
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                raise UsageError(f"{where}: \"embedding\" must be a list of numbers")
            if vectors and len(value) != len(vectors[0]):
                raise UsageError(f"{where}: embedding of width {len(value)}, earlier lines have {len(vectors[0])}")
            vectors.append(value)
            ids.append(video)
        else:
            if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
                raise UsageError(f"{where}: \"attributes\" must be a list of strings or integers")
            if video in content:
                raise UsageError(f"{where}: video {video} is listed twice")
            content[video] = [str(v) for v in value]
    if kind is None:
        raise UsageError(f"{path}: no items")
    if kind == "attributes":
        return ItemsFile(path, "jsonl", np.array(sorted(content), dtype=np.int64), content=content)
    return _embedding_items(path, "jsonl", np.asarray(ids, dtype=np.int64), np.asarray(vectors, dtype=np.float64))


def _embedding_items(path: Path, fmt: str, video_ids: np.ndarray, embeddings: np.ndarray) -> ItemsFile:
    if len(video_ids) == 0:
        raise UsageError(f"{path}: no items")
    if (video_ids < 0).any():
        raise UsageError(f"{path}: video ids must be non-negative")
    if len(np.unique(video_ids)) != len(video_ids):
        raise UsageError(f"{path}: a video id is listed twice")
    if not np.isfinite(embeddings).all():
        raise UsageError(f"{path}: embeddings contain NaN or infinite values")
    order = np.argsort(video_ids, kind="stable")
    return ItemsFile(path, fmt, video_ids[order], embeddings=embeddings[order].astype(np.float32))


# --- the run-level operation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddResult:
    """What `add_items` did (the CLI's --json)."""

    catalog: Catalog  # the run's catalog now (unchanged when nothing was new)
    previous_hash: str
    added: np.ndarray  # (M,) int64 new video ids
    sids: np.ndarray  # (M, L) int32 their SIDs
    already_in_catalog: int
    items_file: Path
    format: str
    placement: str
    embedding: dict[str, Any]  # how the new items were embedded (the map's report, or "given")
    new_prefixes: int  # new items whose (L-1)-prefix no earlier item has: a trie branch the model never saw
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"added": int(len(self.added)), "already_in_catalog": self.already_in_catalog,
                "items_file": str(self.items_file), "format": self.format, "placement": self.placement,
                "previous_hash": self.previous_hash, "content_hash": self.catalog.content_hash,
                "num_items": self.catalog.num_items, "num_sids": self.catalog.num_leaves,
                "embedding": self.embedding, "new_prefixes": self.new_prefixes,
                "video_ids": self.added.tolist(), "sids": self.sids.tolist(), "seconds": round(self.seconds, 3)}


def add_items(run: RunDir, items_path: Path, cfg: AddConfig | None = None, progress: bool = False) -> AddResult:
    """Give every item of `items_path` that RUN/catalog lacks a SID from the trained codebooks and write the extended
    catalog into RUN/catalog (atomically; the replaced one goes to RUN/catalogs/). Nothing is written when there is
    no new item or when anything is wrong (UsageError naming the file)."""
    cfg = cfg or AddConfig()
    started = time.perf_counter()
    run.require("tokenize")
    with advisory_lock(run.root / ".catalog.lock",
                       f"{run.root}: another `catalog add` is running on this run; retry when it ends"):
        catalog = Catalog.load(run.catalog)
        lineage = read_lineage(run.catalog, catalog.content_hash)
        books, base_embeddings = _codebooks(run, catalog, lineage)
        items = read_items(items_path, cfg.format)
        new = items.video_ids[catalog.rows_of(items.video_ids) < 0]  # (M,) ascending
        known = len(items.video_ids) - len(new)
        if items.embeddings is not None and items.embeddings.shape[1] != books.dim:
            raise UsageError(f"{items.path}: embeddings are {items.embeddings.shape[1]} wide, but the tokenizer's "
                             f"space ({run.embeddings}) is {books.dim} wide")
        if len(new) == 0:
            log.info("catalog add: every item of %s is in the catalog already; nothing written", items.path)
            return AddResult(catalog, catalog.content_hash, new, np.zeros((0, catalog.levels), np.int32), known,
                             items.path, items.format, cfg.placement, {}, 0, time.perf_counter() - started)
        vectors, embedding = _embed(items, new, books, base_embeddings, cfg)
        if cfg.placement == "random":
            sids = random_sids(catalog.num_codes, catalog.levels, len(new), catalog.sids,
                               np.random.default_rng(cfg.seed), known_prefixes=cfg.known_prefixes)
        else:
            sids = nearest_sids(books, vectors, catalog.sids, progress=progress, known_prefixes=cfg.known_prefixes)
        extended = Catalog.build(np.concatenate([catalog.video_ids, new]), np.concatenate([catalog.sids, sids]),
                                 np.concatenate([catalog.popularity, np.zeros(len(new), np.int64)]),
                                 catalog.num_codes)
        old_prefixes = {tuple(p) for p in catalog.sids[:, :-1].tolist()}
        new_prefixes = sum(tuple(p) not in old_prefixes for p in sids[:, :-1].tolist())
        entry = {"items_file": str(items.path), "format": items.format, "placement": cfg.placement,
                 "known_prefixes": cfg.known_prefixes,
                 "added": int(len(new)), "previous_hash": catalog.content_hash,
                 "content_hash": extended.content_hash, "at": time.time()}
        chain = {"content_hash": extended.content_hash,
                 "base_hash": lineage["base_hash"] if lineage else catalog.content_hash,
                 "additions": [*(lineage["additions"] if lineage else []), entry]}
        _write(run, extended, books, chain)
    log.info("catalog add: %d new items from %s (%d already in the catalog) -> catalog %s (%d items); serve it with "
             "`onerec deploy --run %s`", len(new), items.path, known, extended.content_hash[:12],
             extended.num_items, run.root)
    return AddResult(extended, catalog.content_hash, new, sids, known, items.path, items.format, cfg.placement,
                     embedding, int(new_prefixes), time.perf_counter() - started)


def read_lineage(catalog_dir: Path, content_hash: str) -> dict[str, Any] | None:
    """RUN/catalog/additions.json when it belongs to the catalog beside it (a re-run `tokenize` leaves a stale one,
    which no longer matches), else None."""
    path = Path(catalog_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        lineage = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: unreadable catalog lineage ({err})") from err
    if not isinstance(lineage, dict) or lineage.get("content_hash") != content_hash:
        return None
    return lineage


def extends(catalog_dir: Path, trained_hash: str) -> bool:
    """Whether RUN/catalog is the catalog with hash `trained_hash` or was grown from it by `catalog add` (every SID
    the model was trained on is unchanged): what `evaluate`'s trained-catalog check may accept."""
    current = Catalog.read_hash(catalog_dir)
    if current == trained_hash:
        return True
    lineage = read_lineage(catalog_dir, current)
    if lineage is None:
        return False
    return trained_hash == lineage["base_hash"] or any(a["previous_hash"] == trained_hash
                                                       for a in lineage["additions"])


def _codebooks(run: RunDir, catalog: Catalog, lineage: dict[str, Any] | None) -> tuple[Codebooks, np.ndarray]:
    """The catalog's codebooks (recovered on the first addition, then RUN/catalog/codebooks.npz) and the base
    items' embeddings (B, d) from RUN/embeddings.npy."""
    from onerec.data.embeddings import load_embeddings

    if lineage is not None:
        books = Codebooks.load(run.catalog / CODEBOOKS_FILE)
        return books, load_embeddings(run.embeddings, len(books.base_video_ids))
    embeddings = load_embeddings(run.embeddings, catalog.num_items)
    books = Codebooks.recover(catalog.sids, embeddings, catalog.num_codes, catalog.video_ids)
    return books, embeddings


def _embed(items: ItemsFile, new: np.ndarray, books: Codebooks, base_embeddings: np.ndarray,
           cfg: AddConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """(M, d) vectors of the new items in the tokenizer's space and how they were made."""
    if items.embeddings is not None:
        return items.embeddings[np.searchsorted(items.video_ids, new)], {"method": "given"}
    assert items.content is not None
    base = books.base_video_ids
    described = np.array([len(items.content.get(int(v), ())) > 0 for v in base], dtype=bool)  # (B,)
    warm = np.flatnonzero(described & (np.abs(base_embeddings).sum(1) > 0))  # (W,)
    if len(warm) < MIN_WARM_ITEMS:
        raise UsageError(f"{items.path}: only {len(warm)} catalog items with an embedding have content features in "
                         f"it (need {MIN_WARM_ITEMS}); the map from content to the tokenizer's embeddings is "
                         "learnt on them, so the file must describe the catalog's items too")
    warm_x, vocabulary = feature_matrix(items.content, base[warm])
    mapping = ContentMap.fit(warm_x, base_embeddings[warm], cfg)
    new_x, _ = feature_matrix(items.content, new, vocabulary)
    no_features = int((np.diff(new_x.indptr) == 0).sum())
    return mapping.predict(new_x), {"method": "ridge", **mapping.report, "new_without_known_features": no_features}


def _write(run: RunDir, catalog: Catalog, books: Codebooks, lineage: dict[str, Any]) -> None:
    """Stage the new catalog beside RUN/catalog, check it reads back, swap it in, archive the old one."""
    staging = run.root / ".catalog.new"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        catalog.save(staging)
        books.save(staging / CODEBOOKS_FILE)
        save_json(staging / LINEAGE_FILE, lineage)
        if Catalog.load(staging).content_hash != catalog.content_hash:  # pragma: no cover (save/load disagree)
            raise UsageError(f"{staging}: the staged catalog does not read back")
        previous = Catalog.read_hash(run.catalog)
        archive = run.root / ARCHIVE_DIR / previous[:16]
        archive.parent.mkdir(exist_ok=True)
        shutil.rmtree(archive, ignore_errors=True)
        exchange(staging, run.catalog)  # RUN/catalog is now the new catalog, `staging` the old one
        staging.rename(archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); where that is unavailable, two renames
    (a reader between them finds no catalog and fails with a usage error, never a mixed one)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(b))
    aside = b.with_name(f".{b.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    b.rename(aside)
    a.rename(b)
    aside.rename(a)


