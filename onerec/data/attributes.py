"""Item attributes (the Amazon `*_item2attributes.json` brand/category ids) as attribute pseudo-users."""

# Legend: N items in video_ids, A distinct attributes.

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from onerec.errors import UsageError

log = logging.getLogger(__name__)


def load_item_attributes(path: Path, video_ids: np.ndarray) -> sp.csr_matrix:
    """(A, N) binary: row a marks the items of `video_ids` that carry attribute a, from a JSON object
    {"item id": [attribute id, ...]}. Items absent from the file have no attribute; attributes no catalogue item
    carries are dropped. UsageError naming the file when it is not such an object."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read item attributes ({exc})") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: item attributes must be a JSON object {{item id: [attribute ids]}}")
    column = {int(v): i for i, v in enumerate(np.asarray(video_ids, dtype=np.int64))}
    items: list[int] = []
    attributes: list[int] = []
    for key, values in raw.items():
        if not isinstance(values, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in values):
            raise UsageError(f"{path}: item {key!r}: attributes must be a list of integer ids")
        try:
            col = column.get(int(key))
        except ValueError:
            raise UsageError(f"{path}: item id {key!r} is not an integer") from None
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
