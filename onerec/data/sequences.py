"""Sequence files (the S3-Rec/TIGER format: one user per line, `user item item ...` in time order) as `Interactions`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from onerec.data.interactions import Interactions
from onerec.errors import UsageError

log = logging.getLogger(__name__)


def load_sequences(path: Path) -> Interactions:
    """Every line `user item1 item2 ...` becomes one implicit positive per item (rating 1.0), its timestamp the
    item's position in the line, so time order is the file's order. UsageError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--path: {path}: sequence file not found")
    users: list[int] = []
    items: list[int] = []
    times: list[int] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                ids = [int(x) for x in fields]
            except ValueError:
                raise UsageError(f"{path}:{number}: not `user item item ...` integers: {line.strip()[:60]!r}") from None
            if len(ids) < 2:
                raise UsageError(f"{path}:{number}: user {ids[0]} has no items")
            users.extend([ids[0]] * (len(ids) - 1))
            items.extend(ids[1:])
            times.extend(range(len(ids) - 1))
    if not users:
        raise UsageError(f"{path}: no sequences")
    log.info("%s: %d users, %d items, %d interactions", path.name, len(set(users)), len(set(items)), len(users))
    return Interactions(users=np.asarray(users), items=np.asarray(items), ratings=np.ones(len(users), np.float32),
                        timestamps=np.asarray(times))
