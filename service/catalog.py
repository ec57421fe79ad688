"""Version pinning: the catalog of the model version Triton serves, loaded from the model repository and checked."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from onerec.errors import UsageError
from onerec.serving import layout
from onerec.tokenizer.catalog import Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pinned:
    """One loaded model version: its catalog, the longest history its encoder takes, and the hash verdict."""

    version: str
    catalog: Catalog
    max_history: int
    matched: bool  # the catalog's content hash equals the served model config's `catalog_hash`
    problem: str | None = None
    bans_in_beam: bool = False  # the served model takes BANNED_SIDS (else exclusions are only filtered)


def load_version(model_dir: Path, version: str, expected_hash: str | None) -> Pinned:
    """Read `model_dir/<version>`'s catalog and manifest; `matched` iff its hash equals `expected_hash`.

    UsageError if the directory or its files are missing or corrupt."""
    directory = model_dir / version
    manifest = layout.Manifest.load(directory)
    catalog = Catalog.load(directory)
    max_history = int(manifest.model.get("history_len", 256))
    if expected_hash is None:
        return Pinned(version, catalog, max_history, matched=False, problem="served model not known yet")
    if catalog.content_hash != expected_hash:
        problem = (f"catalog hash {catalog.content_hash[:12]} of {directory} does not match the served model "
                   f"config's {expected_hash[:12]}")
        return Pinned(version, catalog, max_history, matched=False, problem=problem)
    return Pinned(version, catalog, max_history, matched=True)


def load_latest(model_dir: Path) -> Pinned | None:
    """The newest exported version on disk, unmatched (for popular answers until Triton says what it serves)."""
    for directory in layout.version_dirs(model_dir):
        try:
            return load_version(model_dir, directory.name, None)
        except UsageError as e:
            log.warning("skipping %s: %s", directory, e)
    return None
