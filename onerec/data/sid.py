"""SID-space data shared by the recipes and the engines: sessions as SIDs, known histories, padded history batches.

Legend: S sessions, H history rows, B batch, N history positions, m items per session, L levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from onerec.data.sessions import Sessions

if TYPE_CHECKING:  # only its methods are called: onerec.data stays below the tokenizer
    from onerec.tokenizer.catalog import Catalog


def pad_histories(histories: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SID histories [(n_i, L)] (most recent first) -> padded (B, N, L) long and mask (B, N) bool.

    Histories longer than `max_len` keep their `max_len` most recent items; N = the longest kept length.
    """
    if not histories:
        raise ValueError("pad_histories needs at least one history")
    lengths = [min(len(h), max_len) for h in histories]
    if min(lengths) < 1:
        raise ValueError("every history needs at least one known item (cold-start users are served elsewhere)")
    levels = np.asarray(histories[0]).reshape(len(histories[0]), -1).shape[1]
    n = max(lengths)
    padded = np.zeros((len(histories), n, levels), dtype=np.int64)  # (B, N, L)
    mask = np.zeros((len(histories), n), dtype=bool)  # (B, N)
    for row, (hist, length) in enumerate(zip(histories, lengths, strict=True)):
        padded[row, :length] = np.asarray(hist)[:length]
        mask[row, :length] = True
    return torch.from_numpy(padded), torch.from_numpy(mask)


def known_histories(catalog: Catalog, videos: np.ndarray, video_offsets: np.ndarray, item_sids: np.ndarray,
                    history_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged per-session histories of video ids (concatenated, `video_offsets` (S+1,)) in SID space, with
    unknown videos dropped and each cut to its `history_len` most recent items; item_sids (S, m, L) are
    the sessions' items, -1 where unknown. Keeps the sessions whose items are all catalog items and whose
    history has a known item: returns their rows (S',), history (H', L) int64 and offsets (S'+1,) int64."""
    hist_sids = catalog.sids_of(videos)  # (H, L), -1 rows for unknown videos
    known = hist_sids[:, 0] >= 0
    rows, offsets, chunks = [], [0], []
    for i in range(len(item_sids)):
        lo, hi = video_offsets[i], video_offsets[i + 1]
        h = hist_sids[lo:hi][known[lo:hi]][:history_len]
        if len(h) == 0 or (item_sids[i] < 0).any():
            continue
        rows.append(i)
        chunks.append(h)
        offsets.append(offsets[-1] + len(h))
    history = np.concatenate(chunks) if chunks else np.zeros((0, catalog.levels), dtype=np.int64)
    return np.asarray(rows, dtype=np.int64), history, np.asarray(offsets, dtype=np.int64)


@dataclass(frozen=True)
class SidSessions:
    """Sessions translated to SIDs, ready for batching. Unknown history videos are dropped."""

    history: np.ndarray  # (H, L) int64, each session's history most recent first, concatenated
    offsets: np.ndarray  # (S+1,) int64
    targets: np.ndarray  # (S, m, L) int64, -1 codes after the end of a shorter (padded) target

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_sessions(cls, sessions: Sessions, catalog: Catalog, history_len: int) -> SidSessions:
        """Keep sessions whose target items are catalog items and whose history has >= 1 known item; a padded
        target (video -1 at its end, leave-one-out training windows) keeps -1 codes there, which the loss skips."""
        target_sids = catalog.sids_of(sessions.targets.reshape(-1)).reshape(len(sessions), -1, catalog.levels)
        padding = (sessions.targets < 0)[..., None]  # (S, m, 1)
        rows, history, offsets = known_histories(catalog, sessions.history, sessions.history_offsets,
                                                 np.where(padding, 0, target_sids), history_len)
        return cls(history=history, offsets=offsets, targets=np.where(padding[rows], -1, target_sids[rows]))

    def take(self, idx: np.ndarray) -> SidSessions:
        """The sessions `idx` (S',), in that order."""
        lengths = self.lengths[idx]
        history = np.concatenate(self.histories(idx)) if len(idx) else self.history[:0]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return SidSessions(history=history, offsets=offsets, targets=self.targets[idx])

    def histories(self, idx: np.ndarray) -> list[np.ndarray]:
        return [self.history[self.offsets[i] : self.offsets[i + 1]] for i in idx]

    def batch(self, idx: np.ndarray, history_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """history (B, N, L), mask (B, N), targets (B, m, L) for the sessions `idx`."""
        history, mask = pad_histories(self.histories(idx), history_len)
        return history, mask, torch.from_numpy(self.targets[idx])
