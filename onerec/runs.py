"""The run directory: where each pipeline stage reads and writes, and how a stage is marked complete."""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onerec.config import save_json
from onerec.errors import UsageError

STAGES = ("prepare", "tokenize", "train")
# Stages that hang off the main line: `reward` (onerec train-reward) needs the catalog, not the trained model.
DEPENDENTS = {"tokenize": ("reward",)}


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory. A stage is complete once its marker JSON exists.

    RUN/
      prepare.json                       marker + stats of `onerec prepare`
      data/interactions.npz              every interaction read
      data/train_interactions.npz        positives outside val/test targets (embeddings, popularity)
      data/sessions_{train,val,test}.npz
      embeddings.npy                     item embeddings the tokenizer clustered
      catalog/catalog.npz, catalog.json  SIDs, inverted index, trie, popularity, content hash
      tokenize.json                      marker + tokenizer report
      checkpoints/last/                  resumable training state (model, optimizer, progress)
      model/                             the selected model (best validation loss): model.safetensors + model.json
      train.json                         marker + training history
      reward/, reward.json               the session reward model (`onerec train-reward`) and its marker
      align/iter_t/, align/align.json    IPA iterations (`onerec align`): model directories like model/
      eval.json                          last `onerec evaluate` result
    """

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def interactions(self) -> Path:
        return self.data / "interactions.npz"

    @property
    def train_interactions(self) -> Path:
        return self.data / "train_interactions.npz"

    def sessions(self, split: str) -> Path:
        return self.data / f"sessions_{split}.npz"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.npy"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    def marker(self, stage: str) -> Path:
        return self.root / f"{stage}.json"

    def is_complete(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def read_marker(self, stage: str) -> dict[str, Any]:
        path = self.marker(stage)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: cannot read ({exc})") from exc

    def require(self, stage: str) -> None:
        """UsageError naming the missing stage and the command that makes it."""
        if not self.root.is_dir():
            raise UsageError(f"--run: {self.root} is not a run directory (make one with `onerec prepare`)")
        if not self.is_complete(stage):
            raise UsageError(f"--run: {self.root} has no completed `{stage}` stage; run `onerec {stage}` first")

    def complete(self, stage: str, payload: dict[str, Any]) -> None:
        """Write the stage's marker last, so a crash never leaves a stage looking complete."""
        save_json(self.marker(stage), {"stage": stage, "finished_at": time.time(), **payload})

    def invalidate_from(self, stage: str) -> None:
        """Drop the markers of `stage` and every later stage (their outputs are being replaced)."""
        for later in STAGES[STAGES.index(stage):]:
            self.marker(later).unlink(missing_ok=True)
            for dependent in DEPENDENTS.get(later, ()):
                self.marker(dependent).unlink(missing_ok=True)


@contextmanager
def staging_dir(final: Path):
    """Yield a sibling temp directory; on success it replaces `final`, on error it is removed."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@contextmanager
def advisory_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if absent) for the block; UsageError(busy) at once when
    another process holds it: one `catalog add` per run, one rollout per repository."""
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
