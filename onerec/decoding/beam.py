"""Pure trie-constrained beam search: a step function and a prefix trie in, sessions and scores out."""

# Shapes: B requests, W beams, K codes, L levels, m items per session, R sessions returned, U catalog leaves.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from onerec.tokenizer.trie import PrefixTrie

BOS = 0  # decoder input at every item's first position: [BOS, s^1..s^L] per item


class StepFn(Protocol):
    """The model side of decoding: feeds one decoder position for every beam and keeps its own KV cache.

    Called once for each position p = 0 .. m*(L+1)-2, in order (p is implicit: the callee counts calls).
    `tokens` (B, W) long is the decoder input at p (BOS = 0 where p % (L+1) == 0). `beam_idx` (B, W) long
    says that beam w now continues parent beam beam_idx[b, w] of the previous call: the callee reorders its
    cache by it before appending p (identity when nothing was reordered). Returns logits (B, W, K)
    predicting p+1; outputs where p+1 is a BOS position are ignored. W is fixed for every call (fixed shapes).
    """

    def __call__(self, tokens: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BeamResult:
    """The best R finished sessions of each request, best first."""

    sessions: torch.Tensor  # (B, R, m, L) long SIDs; -1 rows for missing sessions
    leaves: torch.Tensor  # (B, R, m) long trie leaf ids (catalog rows); -1 for missing sessions
    scores: torch.Tensor  # (B, R) float32 sum of log-probabilities, descending; -inf for missing


def exclusion_mask(exclude: Sequence[np.ndarray | None] | None, batch: int, num_leaves: int) -> np.ndarray:
    """Banned leaves (B, U) bool from per-request leaf-id arrays; negative ids (unknown SIDs) are ignored."""
    banned = np.zeros((batch, num_leaves), dtype=bool)
    if exclude is None:
        return banned
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} entries for a batch of {batch}")
    for b, leaves in enumerate(exclude):
        if leaves is None:
            continue
        ids = np.asarray(leaves, dtype=np.int64).reshape(-1)
        if np.any(ids >= num_leaves):
            raise ValueError(f"exclude[{b}] holds leaf ids >= the catalog size {num_leaves}")
        banned[b, ids[ids >= 0]] = True
    return banned


def allowed_codes(
    trie: PrefixTrie, level: int, nodes: np.ndarray, used: np.ndarray, banned: np.ndarray
) -> np.ndarray:
    """Codes (B, W, K) bool each beam may emit at `level`: real trie prefixes and, at the last level, only
    leaves that are neither already in the beam's session nor banned for its request.

    nodes (B, W) the beams' trie nodes at `level`, -1 for dead beams; used (B, W, i) leaves of the items
    finished so far in each beam's session; banned (B, U) from `exclusion_mask`.
    """
    B, W = nodes.shape
    flat = nodes.reshape(-1)  # (B*W,)
    mask = trie.allowed_mask(level, np.maximum(flat, 0))  # (B*W, K)
    mask[flat < 0] = False
    if level == trie.levels - 1:
        rows, codes = np.nonzero(mask)  # candidate (beam, code) pairs that complete a leaf
        leaf = trie.step(level, flat[rows], codes)
        bad = banned[rows // W, leaf] | (used.reshape(B * W, -1)[rows] == leaf[:, None]).any(axis=1)
        mask[rows[bad], codes[bad]] = False
    return mask.reshape(B, W, trie.num_codes)


def top_w(flat: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic top-`width` of each row of flat (B, N): values and indices (B, W), ordered by value
    descending, ties broken by the lower index. torch.topk leaves the choice among ties unspecified, so it
    only decides when the W-th and (W+1)-th values differ (the set is then unique); otherwise the W-th value
    is a threshold and the entries equal to it are taken lowest index first."""
    batch, n = flat.shape
    if n > width:
        values, index = torch.topk(flat, width + 1, dim=-1)  # (B, W+1)
        if not bool((values[:, width] == values[:, width - 1]).any()):
            return order_desc(values[:, :width], index[:, :width])
    threshold = torch.topk(flat, width, dim=-1).values[:, -1:]  # (B, 1)
    above = flat > threshold  # (B, N)
    ties = flat == threshold
    room = width - above.sum(dim=-1, keepdim=True)  # (B, 1) slots left for ties
    take = above | (ties & (torch.cumsum(ties.int(), dim=-1) <= room))  # exactly W per row
    index = take.nonzero()[:, 1].view(batch, width)  # (B, W)
    return order_desc(flat.gather(1, index), index)


def order_desc(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (B, W) pairs by value descending, then index ascending."""
    index, by_index = torch.sort(index, dim=-1)
    values = values.gather(1, by_index)
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(1, by_value), index.gather(1, by_value)


def select(
    scores: torch.Tensor, logp: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam step. scores (B, W) running log-probs; logp (B, W, K) full-codebook log-probs of the next
    code; allowed (B, W, K) bool. Returns new scores, parent beams and codes (B, W): the best W of the W*K
    continuations (ties: lower parent beam, then lower code). Invalid continuations score -inf (dead)."""
    B, W, K = logp.shape
    cand = scores.unsqueeze(-1) + logp  # (B, W, K)
    cand = cand.masked_fill(~allowed | cand.isnan(), float("-inf"))  # a NaN from the model is never selected
    values, index = top_w(cand.view(B, W * K), W)
    return values, index // K, index % K


@dataclass
class Beams:
    """Per-beam trie state, on the CPU beside the numpy trie."""

    nodes: np.ndarray  # (B, W) trie node at the level being generated; -1 for dead beams
    sids: np.ndarray  # (B, W, m, L) codes generated so far (-1 not yet)
    leaves: np.ndarray  # (B, W, m) leaf of each finished item (-1 not yet)

    @classmethod
    def start(cls, batch: int, width: int, session_len: int, levels: int) -> Beams:
        return cls(
            nodes=np.zeros((batch, width), dtype=np.int64),
            sids=np.full((batch, width, session_len, levels), -1, dtype=np.int64),
            leaves=np.full((batch, width, session_len), -1, dtype=np.int64),
        )

    def extend(
        self, trie: PrefixTrie, item: int, level: int, parent: np.ndarray, codes: np.ndarray, dead: np.ndarray
    ) -> None:
        """Beam w continues parent[b, w] (B, W) with codes[b, w] at (item, level); dead (B, W) bool."""
        B, W = parent.shape
        rows = np.arange(B)[:, None]
        self.sids, self.leaves = self.sids[rows, parent], self.leaves[rows, parent]
        self.sids[:, :, item, level] = codes
        nodes = trie.step(level, self.nodes[rows, parent].reshape(-1), codes.reshape(-1)).reshape(B, W)
        self.nodes = np.where(dead, -1, nodes)
        if level == trie.levels - 1:
            self.leaves[:, :, item] = self.nodes

    def next_item(self) -> None:
        """Live beams go back to the trie root for the next item."""
        self.nodes = np.where(self.nodes >= 0, 0, -1)


def beam_search(
    step: StepFn,
    trie: PrefixTrie,
    batch: int,
    session_len: int,
    beam_width: int = 128,
    num_sessions: int = 16,
    exclude: Sequence[np.ndarray | None] | None = None,
    device: torch.device | str = "cpu",
) -> BeamResult:
    """Generate sessions of `session_len` distinct catalog items for `batch` requests, decoding
    [BOS, s1^1..s1^L, BOS, s2^1, .., sm^L] with `step`.

    Scoring: a sequence's score is the sum, over its generated codes, of log_softmax over the full codebook
    (K codes) of the step's logits, i.e. the model's true log-probability of the sequence; the trie and ban
    constraints mask invalid codes to -inf only afterwards, for selection (they never renormalise).
    Constraints: every item is a trie leaf (a real catalog SID), no leaf twice in a session, and no leaf of
    exclude[b] (leaf ids, optional per request) in request b's sessions.
    Selection: per request, the best `beam_width` of the W*K continuations; ties go to the lower parent
    beam, then the lower code, so results are deterministic. At the start only beam 0 is alive. Beams with
    no valid continuation are dead (-inf) and are never returned as sessions.
    Returns the best R = min(num_sessions, beam_width) sessions per request; missing ones are -1 / -inf.
    """
    if batch < 1 or session_len < 1 or beam_width < 1 or num_sessions < 1:
        raise ValueError("batch, session_len, beam_width and num_sessions must all be >= 1")
    B, W, K, L, m = batch, beam_width, trie.num_codes, trie.levels, session_len
    banned = exclusion_mask(exclude, B, trie.num_leaves)  # (B, U)
    arange = torch.arange(W, device=device).expand(B, W)  # (B, W) identity reorder

    scores = torch.full((B, W), float("-inf"), device=device)  # (B, W)
    scores[:, 0] = 0.0  # only beam 0 is alive at the start: no duplicate beams
    beams = Beams.start(B, W, m, L)
    tokens = torch.full((B, W), BOS, dtype=torch.long, device=device)  # (B, W) decoder input at p
    beam_idx = arange

    for p in range(m * (L + 1) - 1):
        logits = step(tokens, beam_idx)  # (B, W, K) predicting p+1
        if tuple(logits.shape) != (B, W, K):
            raise ValueError(f"step returned logits of shape {tuple(logits.shape)}, expected {(B, W, K)}")
        item, level = divmod(p + 1, L + 1)
        level -= 1  # level of the code at p+1; -1 means p+1 is the next item's BOS
        if level < 0:
            tokens, beam_idx = torch.full_like(tokens, BOS), arange
            beams.next_item()
            continue
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, W, K) over the full codebook
        allowed = allowed_codes(trie, level, beams.nodes, beams.leaves[:, :, :item], banned)
        scores, parent, codes = select(scores, logp, torch.from_numpy(allowed).to(logp.device))
        scores = scores.to(device)
        dead = torch.isneginf(scores).cpu().numpy()  # (B, W) no valid continuation
        beams.extend(trie, item, level, parent.cpu().numpy(), codes.cpu().numpy(), dead)
        tokens, beam_idx = codes.to(device), parent.to(device)
    return finish(scores, beams.sids, beams.leaves, min(num_sessions, W))


def finish(scores: torch.Tensor, sids: np.ndarray, leaves: np.ndarray, count: int) -> BeamResult:
    """The first `count` beams (already sorted best first) as a BeamResult, dead ones blanked to -1 / -inf."""
    device = scores.device
    top = scores[:, :count].float()  # (B, R)
    dead = torch.isneginf(top).cpu().numpy()  # (B, R)
    sessions = sids[:, :count].copy()  # (B, R, m, L)
    items = leaves[:, :count].copy()  # (B, R, m)
    sessions[dead] = -1
    items[dead] = -1
    return BeamResult(
        sessions=torch.from_numpy(sessions).to(device),
        leaves=torch.from_numpy(items).to(device),
        scores=top.masked_fill(torch.from_numpy(dead).to(device), float("-inf")),
    )
