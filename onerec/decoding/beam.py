"""Pure trie-constrained beam search: a step function and a prefix trie in, sessions and scores out."""

# Shapes: B requests, W beams, K codes, C candidate codes per beam, L levels, m items per session,
# R sessions returned, U catalog leaves. Candidates (Bc, G, C): (1, 1, C) shared by all beams, or (B, W, C).

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    cache by it before appending p (identity when nothing was reordered). `candidates` (Bc, G, C) long are
    the codes to score for p+1: (1, 1, C) shared by every beam, or (B, W, C) per beam. Returns
    logits (B, W, C): logits[b, w, c] is the logit of code candidates[b | 0, w | 0, c] at p+1; only these
    are computed, so a step never needs the whole codebook's head at the trie's deeper levels. Outputs where
    p+1 is a BOS position are ignored. W is fixed for every call (fixed shapes).
    """

    def __call__(self, tokens: torch.Tensor, beam_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BeamResult:
    """The best R finished sessions of each request, best first."""

    sessions: torch.Tensor  # (B, R, m, L) long SIDs; -1 rows for missing sessions
    leaves: torch.Tensor  # (B, R, m) long trie leaf ids (catalog rows); -1 for missing sessions / non-catalog
    scores: torch.Tensor  # (B, R) float32 sum of log-probabilities, descending; -inf for missing


@dataclass(frozen=True)
class Candidates:
    """What may follow each beam at one level: codes to score and the trie nodes they lead to."""

    codes: np.ndarray  # (Bc, G, C) int64 codes handed to the step function
    nodes: np.ndarray  # (B, W, C) int64 child node at level+1 (leaf id at the last level), -1 where invalid
    valid: np.ndarray  # (B, W, C) bool: a real trie child of a live beam


def gather_candidates(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Full-codebook logits (B, W, K), candidates (Bc, G, C) -> logits of the candidates (B, W, C).

    For step functions (tests, references) that compute every code's logit anyway.
    """
    B, W, _ = logits.shape
    index = candidates.to(logits.device).expand(B, W, candidates.shape[-1])  # (B, W, C)
    return logits.gather(-1, index)


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


def trie_candidates(trie: PrefixTrie, level: int, nodes: np.ndarray, live: np.ndarray) -> Candidates:
    """The trie children of each live beam's node at `level`; nodes (B, W), live (B, W) bool.

    When every live beam sits on the same node (always at level 0: the root) the codes are shared, (1, 1, C),
    so the step scores one candidate list for all; otherwise each beam gets its own children padded to the
    largest count, (B, W, C). Children of a node are contiguous in the CSR trie, so no search is needed.
    """
    B, W = nodes.shape
    offsets, codes = trie.offsets[level], trie.codes[level]
    at = np.where(live, nodes, 0)  # (B, W)
    first = int(at[live][0]) if live.any() else 0
    if np.all(at[live] == first):
        lo, hi = int(offsets[first]), int(offsets[first + 1])
        child = np.arange(lo, hi, dtype=np.int64)  # (C,)
        valid = np.broadcast_to(live[:, :, None], (B, W, hi - lo)).copy()
        return Candidates(
            codes=codes[lo:hi].astype(np.int64)[None, None],
            nodes=np.where(valid, child, -1),
            valid=valid,
        )
    lo = offsets[at]  # (B, W)
    count = np.where(live, offsets[at + 1] - lo, 0)
    width = max(int(count.max()), 1)
    slot = np.arange(width)  # (C,)
    valid = slot < count[:, :, None]  # (B, W, C)
    child = np.where(valid, lo[:, :, None] + slot, -1)
    return Candidates(codes=codes[np.maximum(child, 0)].astype(np.int64), nodes=child, valid=valid)


def full_candidates(num_codes: int, live: np.ndarray) -> Candidates:
    """Unconstrained decoding: every code for every live beam (no trie)."""
    B, W = live.shape
    valid = np.broadcast_to(live[:, :, None], (B, W, num_codes)).copy()
    return Candidates(
        codes=np.arange(num_codes, dtype=np.int64)[None, None],
        nodes=np.zeros((B, W, num_codes), dtype=np.int64),
        valid=valid,
    )


def open_leaf_counts(trie: PrefixTrie, banned: np.ndarray) -> list[np.ndarray]:
    """Per level l = 0..L, counts[l] (B, n_l) int64: how many leaves under each level-l node request b may
    still take (not banned). counts[L] is the leaves themselves; children are contiguous in the CSR trie, so a
    node's count is a difference of one cumulative sum."""
    B = banned.shape[0]
    counts: list[np.ndarray] = [np.empty(0)] * (trie.levels + 1)
    counts[trie.levels] = (~banned).astype(np.int64)  # (B, U)
    for level in range(trie.levels - 1, -1, -1):
        below = np.concatenate([np.zeros((B, 1), dtype=np.int64), np.cumsum(counts[level + 1], axis=1)], axis=1)
        offsets = trie.offsets[level]
        counts[level] = below[:, offsets[1:]] - below[:, offsets[:-1]]  # (B, n_level)
    return counts


def ban_exhausted(cands: Candidates, trie: PrefixTrie, level: int, used: np.ndarray,
                  counts: list[np.ndarray]) -> np.ndarray:
    """valid (B, W, C) minus the children under which no leaf is left for the beam: every leaf below is banned
    for the request (counts, from `open_leaf_counts`) or already in the beam's session (used (B, W, i)).

    At the last level the child is the leaf itself, so this is the exclusion and no-repeat ban. Above it, it keeps
    a beam out of a prefix whose leaves are all the user's history (it would die one level later): every live
    beam can always finish its item, so the search returns sessions whenever the catalog has session_len
    allowed leaves.
    """
    child = cands.nodes  # (B, W, C) level-(level+1) nodes (leaf ids at the last level), -1 where invalid
    rows = np.arange(child.shape[0])[:, None, None]
    left = counts[level + 1][rows, np.maximum(child, 0)]  # (B, W, C)
    if used.shape[-1]:
        up = np.maximum(used, 0)  # (B, W, i) leaves already in the session -> their level-(level+1) ancestor
        for lv in range(trie.levels - 1, level, -1):
            up = trie.parents[lv][up]
        taken = (up[:, :, None, :] == child[..., None]) & (used[:, :, None, :] >= 0)  # (B, W, C, i)
        left = left - taken.sum(axis=-1)
    return cands.valid & (left > 0)


def normalised_log_probs(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """logits (B, W, C), valid (B, W, C) bool -> log-probabilities over each beam's valid candidates.

    The model's distribution conditioned on emitting a real catalog prefix: log_softmax over the trie
    children only. NaN logits count as invalid; rows with nothing valid are -inf throughout.
    """
    logits = logits.float()
    valid = valid & ~logits.isnan()
    if bool(valid.all()):  # the common case at the root: no masking passes over B*W*K entries
        return torch.log_softmax(logits, dim=-1)
    masked = logits.masked_fill(~valid, float("-inf"))
    norm = torch.logsumexp(masked, dim=-1, keepdim=True)  # (B, W, 1), -inf for empty rows
    return (masked - norm).masked_fill(~valid, float("-inf"))


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
    """One beam step. scores (B, W) running log-probs; logp (B, W, C) log-probs of each beam's candidates;
    allowed (B, W, C) bool. Returns new scores, parent beams and candidate slots (B, W): the best W of the
    W*C continuations (ties: lower parent beam, then lower slot; slots hold codes ascending, so lower code).
    Invalid continuations score -inf (dead)."""
    B, W, C = logp.shape
    cand = scores.unsqueeze(-1) + logp  # (B, W, C)
    bad = ~allowed | cand.isnan()
    if bool(bad.any()):
        cand = cand.masked_fill(bad, float("-inf"))
    values, index = top_w(cand.reshape(B, W * C), W)
    return values, index // C, index % C


@dataclass
class Beams:
    """Per-beam trie state, on the CPU beside the numpy trie."""

    nodes: np.ndarray  # (B, W) trie node at the level being generated
    sids: np.ndarray  # (B, W, m, L) codes generated so far (-1 not yet)
    leaves: np.ndarray  # (B, W, m) leaf of each finished item (-1 not yet)

    @classmethod
    def start(cls, batch: int, width: int, session_len: int, levels: int) -> Beams:
        return cls(
            nodes=np.zeros((batch, width), dtype=np.int64),
            sids=np.full((batch, width, session_len, levels), -1, dtype=np.int64),
            leaves=np.full((batch, width, session_len), -1, dtype=np.int64),
        )

    def extend(self, cands: Candidates, item: int, level: int, parent: np.ndarray, slot: np.ndarray) -> None:
        """Beam w continues parent[b, w] (B, W) with the candidate in slot[b, w] at (item, level)."""
        B, W = parent.shape
        rows = np.arange(B)[:, None]
        self.sids, self.leaves = self.sids[rows, parent], self.leaves[rows, parent]
        codes = np.broadcast_to(cands.codes, (B, W, cands.codes.shape[-1]))
        self.sids[:, :, item, level] = codes[rows, parent, slot]
        self.nodes = cands.nodes[rows, parent, slot]
        if level == self.sids.shape[-1] - 1:
            self.leaves[:, :, item] = self.nodes

    def next_item(self) -> None:
        """Beams go back to the trie root for the next item."""
        self.nodes = np.zeros_like(self.nodes)


def beam_search(
    step: StepFn,
    trie: PrefixTrie,
    batch: int,
    session_len: int,
    beam_width: int = 128,
    num_sessions: int = 16,
    exclude: Sequence[np.ndarray | None] | None = None,
    device: torch.device | str = "cpu",
    constrained: bool = True,
    cancelled: Callable[[], bool] | None = None,
) -> BeamResult:
    """Generate sessions of `session_len` distinct catalog items for `batch` requests, decoding
    [BOS, s1^1..s1^L, BOS, s2^1, .., sm^L] with `step`.

    Scoring: a sequence's score is the sum, over its generated codes, of the code's log-probability
    normalised over the trie children of its prefix (`normalised_log_probs`): only valid children are ever
    scored, never the whole codebook. The no-repeat and `exclude` bans remove candidates after normalising,
    and so is any prefix with no allowed leaf left below it (`ban_exhausted`), so beams never die on a prefix
    whose items are all excluded.
    Constraints: every item is a trie leaf (a real catalog SID), no leaf twice in a session, and no leaf of
    exclude[b] (leaf ids, optional per request) in request b's sessions.
    `constrained=False` is the unconstrained peer for benchmarks: every code is a candidate at every level,
    normalised over the whole codebook, with no trie, repeat or exclusion checks (leaves of non-catalog
    SIDs are -1).
    Selection: per request, the best `beam_width` continuations; ties go to the lower parent beam, then the
    lower code, so results are deterministic. At the start only beam 0 is alive. Beams with no valid
    continuation are dead (-inf) and are never returned as sessions.
    `cancelled()`, when given, is asked before every step; True stops the search with CancelledError.
    Returns the best R = min(num_sessions, beam_width) sessions per request; missing ones are -1 / -inf.
    """
    if batch < 1 or session_len < 1 or beam_width < 1 or num_sessions < 1:
        raise ValueError("batch, session_len, beam_width and num_sessions must all be >= 1")
    B, W, K, L, m = batch, beam_width, trie.num_codes, trie.levels, session_len
    banned = exclusion_mask(exclude, B, trie.num_leaves)  # (B, U)
    counts = open_leaf_counts(trie, banned) if constrained else []  # per level (B, n_l): leaves still allowed
    arange = torch.arange(W, device=device).expand(B, W)  # (B, W) identity reorder
    no_candidates = torch.zeros((1, 1, 1), dtype=torch.long, device=device)  # before a BOS position

    scores = torch.full((B, W), float("-inf"), device=device)  # (B, W)
    scores[:, 0] = 0.0  # only beam 0 is alive at the start: no duplicate beams
    beams = Beams.start(B, W, m, L)
    tokens = torch.full((B, W), BOS, dtype=torch.long, device=device)  # (B, W) decoder input at p
    beam_idx = arange

    for p in range(m * (L + 1) - 1):
        if cancelled is not None and cancelled():
            raise CancelledError(f"cancelled before decoder position {p}")
        item, level = divmod(p + 1, L + 1)
        level -= 1  # level of the code at p+1; -1 means p+1 is the next item's BOS
        if level < 0:
            check_logits(step(tokens, beam_idx, no_candidates), B, W, 1)
            tokens, beam_idx = torch.full_like(tokens, BOS), arange
            beams.next_item()
            continue
        live = ~torch.isneginf(scores).cpu().numpy()  # (B, W)
        if constrained:
            cands = trie_candidates(trie, level, beams.nodes, live)
            allowed = ban_exhausted(cands, trie, level, beams.leaves[:, :, :item], counts)
        else:
            cands = full_candidates(K, live)
            allowed = cands.valid
        C = cands.codes.shape[-1]
        logits = check_logits(step(tokens, beam_idx, torch.from_numpy(cands.codes).to(device)), B, W, C)
        logp = normalised_log_probs(logits, torch.from_numpy(cands.valid).to(logits.device))  # (B, W, C)
        scores, parent, slot = select(scores, logp, torch.from_numpy(allowed).to(logp.device))
        scores = scores.to(device)
        parent_np, slot_np = parent.cpu().numpy(), slot.cpu().numpy()
        beams.extend(cands, item, level, parent_np, slot_np)
        tokens, beam_idx = torch.from_numpy(beams.sids[:, :, item, level].copy()).to(device), parent.to(device)
    if not constrained:
        beams.leaves = trie.leaf_of(beams.sids.reshape(-1, L)).reshape(B, W, m)
    return finish(scores, beams.sids, beams.leaves, min(num_sessions, W))


class CancelledError(RuntimeError):
    """The caller asked beam search to stop early."""


def check_logits(logits: torch.Tensor, batch: int, width: int, count: int) -> torch.Tensor:
    """The step's output must be (B, W, C)."""
    if tuple(logits.shape) != (batch, width, count):
        raise ValueError(f"step returned logits of shape {tuple(logits.shape)}, expected {(batch, width, count)}")
    return logits


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
