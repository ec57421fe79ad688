"""Item content: Amazon `*_item2attributes.json` ids (as attribute pseudo-users) and MovieLens `u.item` genres/years."""

# Legend: N items in video_ids, A distinct attributes, M items described by a content file, F content features.

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from onerec.errors import UsageError

log = logging.getLogger(__name__)

MOVIELENS_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                    "Thriller", "War", "Western")  # u.item's 19 flag columns, in order (u.genre)
U_ITEM_FIELDS = 5 + len(MOVIELENS_GENRES)  # id|title|release date|video release date|IMDb URL|19 genre flags
FIRST_YEAR_BY_YEAR = 1990  # release years from here on are one feature each, earlier ones one per decade


def read_item_attributes(path: Path) -> dict[int, list[int]]:
    """{item id: [attribute id, ...]} from a JSON object {"item id": [attribute id, ...]} (the S3-Rec release's
    `*_item2attributes.json`); UsageError naming the file when it is not such an object."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read item attributes ({exc})") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: item attributes must be a JSON object {{item id: [attribute ids]}}")
    out: dict[int, list[int]] = {}
    for key, values in raw.items():
        if not isinstance(values, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in values):
            raise UsageError(f"{path}: item {key!r}: attributes must be a list of integer ids")
        try:
            out[int(key)] = values
        except ValueError:
            raise UsageError(f"{path}: item id {key!r} is not an integer") from None
    return out


def load_item_attributes(path: Path, video_ids: np.ndarray) -> sp.csr_matrix:
    """(A, N) binary: row a marks the items of `video_ids` that carry attribute a, from a JSON object
    {"item id": [attribute id, ...]}. Items absent from the file have no attribute; attributes no catalogue item
    carries are dropped. UsageError naming the file when it is not such an object."""
    path = Path(path)
    raw = read_item_attributes(path)
    column = {int(v): i for i, v in enumerate(np.asarray(video_ids, dtype=np.int64))}
    items: list[int] = []
    attributes: list[int] = []
    for key, values in raw.items():
        col = column.get(key)
        if col is not None:
            items.extend([col] * len(values))
            attributes.extend(values)
    _, rows = np.unique(np.asarray(attributes, dtype=np.int64), return_inverse=True)
    n_attr = int(rows.max(initial=-1)) + 1
    matrix = sp.csr_matrix((np.ones(len(rows)), (rows, np.asarray(items, dtype=np.int64))),
                           shape=(n_attr, len(column)))
    matrix.data[:] = 1.0  # an attribute listed twice for one item counts once
    log.info("item attributes: %d attributes on %d of %d items (%s)", n_attr,
             int((np.diff(matrix.tocsc().indptr) > 0).sum()), len(column), path.name)
    return matrix


def attribute_lists(path: Path, video_ids: np.ndarray) -> tuple[list[list[int]], int]:
    """Each of `video_ids`' attributes as rows 1..A of an embedding table (0 is left for padding): the rows of
    `load_item_attributes`' (A, N) matrix plus one, in ascending attribute id; and A + 1, the table's rows. Items
    absent from the file get []."""
    by_item = load_item_attributes(path, video_ids).tocsc()  # (A, N): column i holds item i's attributes, sorted
    rows = [(by_item.indices[by_item.indptr[i]:by_item.indptr[i + 1]] + 1).tolist() for i in range(by_item.shape[1])]
    return rows, by_item.shape[0] + 1


def read_movielens_items(path: Path) -> dict[int, list[str]]:
    """{movie id: content features} from MovieLens 100K's `u.item` (latin-1, `|`-separated): "genre:<name>" for each
    set genre flag, and the release year as "year:<yyyy>" (from FIRST_YEAR_BY_YEAR on) or "decade:<yyy0>" (none when
    the date is empty). UsageError naming the file and the line of a malformed row."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="latin-1").splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read movie items ({exc})") from exc
    out: dict[int, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        flags = fields[5:]
        if len(fields) != U_ITEM_FIELDS or any(f not in ("0", "1") for f in flags):
            raise UsageError(f"{path}:{number}: malformed u.item row (want {U_ITEM_FIELDS} `|` fields, the last "
                             f"{len(MOVIELENS_GENRES)} genre flags 0/1): {line[:80]!r}")
        try:
            movie = int(fields[0])
        except ValueError:
            raise UsageError(f"{path}:{number}: movie id {fields[0]!r} is not an integer") from None
        if movie in out:
            raise UsageError(f"{path}:{number}: movie {movie} is listed twice")
        features = [f"genre:{g}" for g, flag in zip(MOVIELENS_GENRES, flags, strict=True) if flag == "1"]
        year = fields[2].strip()[-4:]
        if year.isdigit():
            features.append(f"year:{year}" if int(year) >= FIRST_YEAR_BY_YEAR else f"decade:{year[:3]}0")
        out[movie] = features
    if not out:
        raise UsageError(f"{path}: no movie rows")
    return out


def feature_matrix(content: dict[int, list[str]], video_ids: np.ndarray,
                   vocabulary: list[str] | None = None) -> tuple[sp.csr_matrix, list[str]]:
    """(M, F) binary rows for `video_ids` (items absent from `content` get an empty row) over `vocabulary` (default:
    every feature `content` holds, sorted); features outside a given vocabulary are ignored."""
    if vocabulary is None:
        vocabulary = sorted({str(f) for features in content.values() for f in features})
    column = {name: j for j, name in enumerate(vocabulary)}
    rows: list[int] = []
    cols: list[int] = []
    for i, video in enumerate(np.asarray(video_ids, dtype=np.int64).tolist()):
        for feature in {str(f) for f in content.get(video, ())}:
            j = column.get(feature)
            if j is not None:
                rows.append(i)
                cols.append(j)
    matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(video_ids), len(vocabulary)))
    return matrix, vocabulary
