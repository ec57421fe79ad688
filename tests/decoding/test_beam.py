"""Beam search equals brute-force enumeration, honours the trie and bans, and drives the step fn as agreed."""

# Shapes: B requests, W beams, K codes, L levels, m items per session, R sessions returned, U catalog leaves.

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onerec.decoding.beam import (
    BeamResult,
    beam_search,
    exclusion_mask,
    gather_candidates,
    normalised_log_probs,
    open_leaf_counts,
    select,
    top_w,
)
from onerec.tokenizer.trie import PrefixTrie

MOD = 2**31 - 1  # running prefix hash modulus (a prime)
TABLE = 4096  # logit rows per request the hash indexes into


def mix(h: torch.Tensor | int, token: torch.Tensor | int) -> torch.Tensor | int:
    """Extend a prefix hash by one token."""
    return (h * 1_000_003 + token + 1) % MOD


class HashStep:
    """Fake model: logits are a fixed random function of (request, whole prefix), via a running prefix hash.

    Its "cache" is the per-beam hash, reordered by beam_idx exactly as a KV cache would be, so a wrong
    beam_idx makes it score the wrong prefix. Records every call.
    """

    def __init__(self, table: torch.Tensor, width: int) -> None:
        self.table = table  # (B, TABLE, K)
        self.hash = torch.zeros(table.shape[0], width, dtype=torch.long)  # (B, W)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.candidates: list[torch.Tensor] = []

    @classmethod
    def random(cls, batch: int, codes: int, width: int, seed: int) -> HashStep:
        gen = torch.Generator().manual_seed(seed)
        return cls(2.0 * torch.randn(batch, TABLE, codes, generator=gen), width)

    def __call__(self, tokens: torch.Tensor, beam_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        self.calls.append((tokens.clone(), beam_idx.clone()))
        self.candidates.append(candidates.clone())
        self.hash = mix(self.hash.gather(1, beam_idx), tokens)
        full = self.table[torch.arange(self.table.shape[0])[:, None], self.hash % TABLE]  # (B, W, K)
        return gather_candidates(full, candidates)  # (B, W, C)

    def score(self, b: int, session: np.ndarray, trie: PrefixTrie) -> float:
        """Log-probability of session (m, L) for request b, each code normalised over the trie children of
        its prefix: what beam search must report."""
        seq = decoder_tokens(session)
        logits = self.table[b].double()  # (TABLE, K)
        h, total, node = 0, 0.0, 0
        levels = session.shape[1]
        for p in range(len(seq) - 1):
            h = mix(h, seq[p])
            level = (p + 1) % (levels + 1) - 1
            if level < 0:
                node = 0
                continue
            children, _ = trie.children(level, node)
            code = seq[p + 1]
            total += float(logits[h % TABLE, code] - torch.logsumexp(logits[h % TABLE, children], dim=0))
            node = trie.child(level, node, code)
        return total


def decoder_tokens(session: np.ndarray) -> list[int]:
    """[BOS, s1^1..s1^L, BOS, s2^1, ..] for a session (m, L)."""
    return [t for item in session for t in (0, *(int(c) for c in item))]


def catalog(codes: int, levels: int, ids: list[int]) -> np.ndarray:
    """Unique SIDs (U, L), lexicographic, from integers read as base-K digit strings."""
    digits = [[(i // codes ** (levels - 1 - j)) % codes for j in range(levels)] for i in sorted(set(ids))]
    return np.asarray(digits, dtype=np.int64).reshape(-1, levels)


def brute_force(step: HashStep, trie: PrefixTrie, b: int, m: int, exclude: np.ndarray | None):
    """Every valid session of request b (distinct, non-excluded leaves) with its score, best first."""
    sids = trie.leaf_sids()
    ok = [leaf for leaf in range(trie.num_leaves) if exclude is None or leaf not in set(exclude.tolist())]
    found = [(step.score(b, sids[list(combo)], trie), combo) for combo in itertools.permutations(ok, m)]
    found.sort(key=lambda x: -x[0])
    return found


def check_invariants(res: BeamResult, trie: PrefixTrie, banned: np.ndarray, R: int) -> None:
    """Valid catalog items, distinct within a session, none banned, scores descending, dead rows blank."""
    B, m, L = res.sessions.shape[0], res.sessions.shape[2], trie.levels
    assert res.sessions.shape == (B, R, m, L) and res.leaves.shape == (B, R, m) and res.scores.shape == (B, R)
    assert res.sessions.dtype == torch.long and res.leaves.dtype == torch.long
    assert res.scores.dtype == torch.float32
    scores = res.scores.numpy()
    assert np.all(scores[:, :-1] >= scores[:, 1:])
    for b in range(B):
        for r in range(R):
            leaves, sids = res.leaves[b, r].numpy(), res.sessions[b, r].numpy()
            if np.isinf(scores[b, r]):
                assert scores[b, r] < 0 and np.all(leaves == -1) and np.all(sids == -1)
                continue
            assert np.all(trie.leaf_of(sids) == leaves) and np.all(leaves >= 0)
            assert len(set(leaves.tolist())) == m
            assert not banned[b, leaves].any()


def check_calls(calls: list[tuple[torch.Tensor, torch.Tensor]], B: int, W: int, K: int, L: int, m: int):
    """One call per position 0..T-2; BOS inputs get token 0 and identity beam_idx; all indices in range."""
    assert len(calls) == m * (L + 1) - 1
    for p, (tokens, beam_idx) in enumerate(calls):
        assert tokens.shape == (B, W) and beam_idx.shape == (B, W)
        assert tokens.dtype == torch.long and beam_idx.dtype == torch.long
        assert torch.all((beam_idx >= 0) & (beam_idx < W))
        assert torch.all((tokens >= 0) & (tokens < K))
        if p % (L + 1) == 0:
            assert torch.all(tokens == 0)
            assert torch.equal(beam_idx, torch.arange(W).expand(B, W))


@pytest.mark.parametrize(
    ("codes", "levels", "m", "ids", "exclude"),
    [
        (3, 2, 2, list(range(9)), None),  # full K^L catalog
        (3, 2, 2, [0, 1, 4, 5, 7], [np.array([4])]),  # sparse catalog, one leaf excluded
        (2, 2, 3, [0, 1, 2, 3], [np.array([-1, 2])]),  # unknown (-1) ids in exclude are ignored
        (3, 1, 2, [0, 2], None),  # one level
    ],
)
def test_matches_brute_force(codes, levels, m, ids, exclude):
    trie = PrefixTrie.from_sids(catalog(codes, levels, ids), codes)
    W = codes ** (levels * m)  # more than every partial prefix: nothing is ever pruned
    step = HashStep.random(1, codes, W, seed=7)
    res = beam_search(step, trie, batch=1, session_len=m, beam_width=W, num_sessions=W, exclude=exclude)
    want = brute_force(step, trie, 0, m, None if exclude is None else exclude[0])
    n = len(want)
    assert 0 < n < W
    np.testing.assert_allclose(res.scores[0, :n].numpy(), [s for s, _ in want], rtol=1e-5, atol=1e-5)
    assert torch.all(torch.isneginf(res.scores[0, n:]))
    got_leaves = [tuple(row) for row in res.leaves[0, :n].tolist()]
    assert got_leaves == [combo for _, combo in want]
    sids = trie.leaf_sids()
    for r, (_, combo) in enumerate(want):
        assert np.array_equal(res.sessions[0, r].numpy(), sids[list(combo)])
    check_invariants(res, trie, exclusion_mask(exclude, 1, trie.num_leaves), W)
    check_calls(step.calls, 1, W, codes, levels, m)


def test_returns_best_num_sessions():
    trie = PrefixTrie.from_sids(catalog(3, 2, list(range(9))), 3)
    step = HashStep.random(1, 3, 81, seed=3)
    res = beam_search(step, trie, batch=1, session_len=2, beam_width=81, num_sessions=5)
    want = brute_force(step, trie, 0, 2, None)[:5]
    assert res.scores.shape == (1, 5)
    assert [tuple(r) for r in res.leaves[0].tolist()] == [combo for _, combo in want]
    np.testing.assert_allclose(res.scores[0].numpy(), [s for s, _ in want], rtol=1e-5, atol=1e-5)


def test_num_sessions_capped_by_beam_width():
    trie = PrefixTrie.from_sids(catalog(3, 2, list(range(9))), 3)
    res = beam_search(HashStep.random(2, 3, 4, seed=0), trie, batch=2, session_len=2, beam_width=4,
                      num_sessions=16)
    assert res.sessions.shape == (2, 4, 2, 2)
    check_invariants(res, trie, np.zeros((2, 9), dtype=bool), 4)


def test_step_receives_bos_and_chosen_codes_along_parent_lineage():
    K, L, m, W = 3, 2, 3, 6
    trie = PrefixTrie.from_sids(catalog(K, L, [0, 1, 3, 4, 5, 7, 8]), K)
    step = HashStep.random(1, K, W, seed=11)
    prefixes = [()] * W  # what a KV cache reordered by beam_idx would hold, per beam
    history = []

    def recording(tokens, beam_idx, candidates):
        nonlocal prefixes
        prefixes = [prefixes[int(j)] + (int(t),) for j, t in zip(beam_idx[0], tokens[0], strict=True)]
        history.append(list(prefixes))
        return step(tokens, beam_idx, candidates)

    res = beam_search(recording, trie, batch=1, session_len=m, beam_width=W, num_sessions=W)
    check_calls(step.calls, 1, W, K, L, m)
    # The lineage is exercised: some call continues a beam other than itself.
    assert any(not torch.equal(idx, torch.arange(W).expand(1, W)) for _, idx in step.calls)
    alive = ~torch.isinf(res.scores[0])
    assert alive.sum() > 1
    for r in torch.nonzero(alive)[:, 0].tolist():
        seq = tuple(decoder_tokens(res.sessions[0, r].numpy()))
        # Every returned session, minus its last code, is a prefix the step fn was fed, step by step.
        assert seq[:-1] in history[-1]
        for p in range(len(seq) - 1):
            assert seq[: p + 1] in history[p]
        assert float(res.scores[0, r]) == pytest.approx(step.score(0, res.sessions[0, r].numpy(), trie), abs=1e-5)


def test_tie_break_is_lowest_parent_then_lowest_code():
    trie = PrefixTrie.from_sids(catalog(3, 2, list(range(9))), 3)

    def uniform(tokens, beam_idx, candidates):
        return torch.zeros(*tokens.shape, candidates.shape[-1])

    res = beam_search(uniform, trie, batch=1, session_len=2, beam_width=4, num_sessions=4)
    assert res.leaves[0].tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    np.testing.assert_allclose(res.scores[0].numpy(), np.full(4, -4 * math.log(3)), rtol=1e-6)


def test_top_w_ties_take_lowest_index():
    flat = torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0, float("-inf")], [float("-inf")] * 5 + [0.0]])
    values, index = top_w(flat, 3)
    assert index.tolist() == [[1, 3, 0], [5, 0, 1]]
    assert values[0].tolist() == [2.0, 2.0, 1.0] and values[1, 0] == 0.0 and torch.all(values[1, 1:].isinf())


def test_select_masks_invalid_and_keeps_given_scores():
    scores = torch.tensor([[0.0, -1.0]])  # (B=1, W=2)
    logp = torch.log_softmax(torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]]), dim=-1)
    allowed = torch.tensor([[[True, True, False], [False, True, True]]])
    values, parent, codes = select(scores, logp, allowed)
    cand = {(w, k): scores[0, w] + logp[0, w, k] for w, k in [(0, 0), (0, 1), (1, 1), (1, 2)]}
    best = sorted(cand, key=lambda k: (-float(cand[k]), k))[:2]
    assert list(zip(parent[0].tolist(), codes[0].tolist(), strict=True)) == best
    torch.testing.assert_close(values[0], torch.stack([cand[k] for k in best]))


@pytest.mark.parametrize(("ids", "m", "exclude"), [([0, 4], 3, None), ([0, 4, 8], 2, [np.array([0, 2])])])
def test_too_few_items_gives_missing_sessions(ids, m, exclude):
    trie = PrefixTrie.from_sids(catalog(3, 2, ids), 3)
    res = beam_search(HashStep.random(1, 3, 8, seed=1), trie, batch=1, session_len=m, beam_width=8,
                      num_sessions=4, exclude=exclude)
    assert torch.all(res.sessions == -1) and torch.all(res.leaves == -1)
    assert torch.all(torch.isneginf(res.scores))


def test_excluded_and_used_items_never_returned():
    trie = PrefixTrie.from_sids(catalog(3, 2, [0, 1, 2, 3]), 3)  # leaves 0..3; three under code 0
    res = beam_search(HashStep.random(1, 3, 8, seed=2), trie, batch=1, session_len=2, beam_width=8,
                      num_sessions=8, exclude=[np.array([1, 2])])
    alive = ~torch.isinf(res.scores[0])
    assert sorted(tuple(r) for r in res.leaves[0][alive].tolist()) == [(0, 3), (3, 0)]


def test_batch_equals_requests_alone():
    K, L, m, W = 4, 2, 3, 5
    trie = PrefixTrie.from_sids(catalog(K, L, [0, 1, 2, 5, 6, 9, 10, 11, 13, 15]), K)
    table = HashStep.random(3, K, W, seed=5).table
    exclude = [np.array([0, 3]), None, np.array([9, 1, 2])]
    together = beam_search(HashStep(table, W), trie, batch=3, session_len=m, beam_width=W, num_sessions=3,
                           exclude=exclude)
    check_invariants(together, trie, exclusion_mask(exclude, 3, trie.num_leaves), 3)
    for b in range(3):
        alone = beam_search(HashStep(table[b : b + 1], W), trie, batch=1, session_len=m, beam_width=W,
                            num_sessions=3, exclude=[exclude[b]])
        assert torch.equal(together.sessions[b], alone.sessions[0])
        assert torch.equal(together.leaves[b], alone.leaves[0])
        assert torch.equal(together.scores[b], alone.scores[0])
    assert not torch.equal(together.leaves[0], together.leaves[1])


def test_fp16_logits_and_nan_are_handled():
    trie = PrefixTrie.from_sids(catalog(3, 2, list(range(9))), 3)
    inner = HashStep.random(1, 3, 4, seed=4)

    def half_with_nan(tokens, beam_idx, candidates):
        logits = inner(tokens, beam_idx, candidates).half()
        logits[0, 0, 0] = float("nan")
        return logits

    res = beam_search(half_with_nan, trie, batch=1, session_len=2, beam_width=4, num_sessions=4)
    assert res.scores.dtype == torch.float32
    check_invariants(res, trie, np.zeros((1, 9), dtype=bool), 4)


def test_rejects_bad_inputs():
    trie = PrefixTrie.from_sids(catalog(3, 2, list(range(9))), 3)
    with pytest.raises(ValueError, match="logits of shape"):
        beam_search(lambda t, i, c: torch.zeros(1, 4, 2), trie, batch=1, session_len=2, beam_width=4)
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        beam_search(HashStep.random(1, 3, 4, 0), trie, 1, 2, 4, exclude=[None, None])
    with pytest.raises(ValueError, match="catalog size"):
        beam_search(HashStep.random(1, 3, 4, 0), trie, 1, 2, 4, exclude=[np.array([9])])
    with pytest.raises(ValueError, match=">= 1"):
        beam_search(HashStep.random(1, 3, 4, 0), trie, 1, 0, 4)


@st.composite
def problems(draw, max_leaves: int = 8):
    K = draw(st.integers(1, 4))
    L = draw(st.integers(1, 3))
    ids = draw(st.lists(st.integers(0, K**L - 1), min_size=1, max_size=max_leaves, unique=True))
    U = len(ids)
    B = draw(st.integers(1, 2))
    one = st.one_of(st.none(), st.lists(st.integers(-1, U - 1), max_size=U).map(np.array))
    exclude = draw(st.one_of(st.none(), st.lists(one, min_size=B, max_size=B)))
    m = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return K, L, catalog(K, L, ids), B, exclude, m, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(1, 8), st.integers(1, 6))
def test_property_constraints_hold(problem, W, R):
    K, L, sids, B, exclude, m, seed = problem
    trie = PrefixTrie.from_sids(sids, K)
    step = HashStep.random(B, K, W, seed)
    res = beam_search(step, trie, batch=B, session_len=m, beam_width=W, num_sessions=R, exclude=exclude)
    banned = exclusion_mask(exclude, B, trie.num_leaves)
    check_invariants(res, trie, banned, min(R, W))
    check_calls(step.calls, B, W, K, L, m)
    for b in range(B):
        # no dead ends: any beam width finds a session whenever the catalog has m allowed leaves
        assert bool(torch.isfinite(res.scores[b, 0])) == (int((~banned[b]).sum()) >= m)
        for r in range(min(R, W)):
            if not torch.isinf(res.scores[b, r]):
                want = step.score(b, res.sessions[b, r].numpy(), trie)
                assert float(res.scores[b, r]) == pytest.approx(want, abs=1e-4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_leaves=4))
def test_property_wide_beam_is_exhaustive(problem):
    K, L, sids, B, exclude, m, seed = problem
    W = 64  # > P(4, 2) * 4 partial prefixes: never prunes
    trie = PrefixTrie.from_sids(sids, K)
    step = HashStep.random(B, K, W, seed)
    res = beam_search(step, trie, batch=B, session_len=m, beam_width=W, num_sessions=W, exclude=exclude)
    for b in range(B):
        want = brute_force(step, trie, b, m, None if exclude is None or exclude[b] is None else exclude[b])
        n = len(want)
        np.testing.assert_allclose(res.scores[b, :n].numpy(), [s for s, _ in want], rtol=1e-5, atol=1e-4)
        assert torch.all(torch.isneginf(res.scores[b, n:]))


def prefer_low_codes(tokens: torch.Tensor, beam_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """A greedy model's step: code c gets logit -10c, so code 0 always wins by far."""
    return (-10.0 * candidates.float()).expand(tokens.shape[0], tokens.shape[1], candidates.shape[-1])


def test_open_leaf_counts_by_hand():
    trie = PrefixTrie.from_sids(catalog(2, 2, [0, 1, 2]), 2)  # leaves (0,0) (0,1) (1,0); nodes 0, 1 at level 1
    counts = open_leaf_counts(trie, np.array([[True, False, False], [True, True, False]]))
    assert counts[2].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert counts[1].tolist() == [[1, 1], [0, 1]]  # request 1: nothing left under prefix 0
    assert counts[0].tolist() == [[2], [1]]


def test_greedy_beam_avoids_a_prefix_whose_leaves_are_all_excluded():
    """Width 1, the model wants code 0 at every level, and both leaves under prefix 0 are the user's history:
    the beam must take prefix 1 (the only way to an allowed item) instead of dying one level later."""
    trie = PrefixTrie.from_sids(catalog(2, 2, [0, 1, 2]), 2)
    res = beam_search(prefer_low_codes, trie, batch=1, session_len=1, beam_width=1, num_sessions=1,
                      exclude=[np.array([0, 1])])
    assert res.leaves.tolist() == [[[2]]] and res.sessions.tolist() == [[[[1, 0]]]]
    assert float(res.scores[0, 0]) == pytest.approx(-10.0 - math.log1p(math.exp(-10.0)), abs=1e-5)


def test_greedy_beam_avoids_a_prefix_used_up_by_its_own_session():
    """Width 1, session of 2 from leaves (0,0) (1,0) (1,1): after item (0,0) prefix 0 has no leaf left for
    this beam, so item 2 goes under prefix 1, and the greedy code 0 there."""
    trie = PrefixTrie.from_sids(catalog(2, 2, [0, 2, 3]), 2)
    res = beam_search(prefer_low_codes, trie, batch=1, session_len=2, beam_width=1, num_sessions=1)
    assert res.leaves.tolist() == [[[0, 1]]]


def test_candidates_are_the_trie_children_shared_at_the_root():
    K, L, m, W = 4, 3, 2, 8
    ids = [0, 1, 5, 17, 18, 33, 60, 63]
    trie = PrefixTrie.from_sids(catalog(K, L, ids), K)
    step = HashStep.random(1, K, W, seed=9)
    beam_search(step, trie, batch=1, session_len=m, beam_width=W, num_sessions=2)
    roots = trie.children(0, 0)[0].tolist()
    for p, cands in enumerate(step.candidates):
        level = (p + 1) % (L + 1) - 1
        if level < 0:
            assert cands.shape == (1, 1, 1)  # nothing is scored before a BOS
        elif level == 0:
            assert cands.shape == (1, 1, len(roots)) and cands[0, 0].tolist() == roots
        else:
            assert cands.shape[:2] in {(1, 1), (1, W)} and cands.shape[-1] <= K
    # Deeper levels score each beam's own children: fewer than the codebook here (sparse catalog).
    assert any(c.shape[-1] < K for c in step.candidates[2:])


def test_normalised_log_probs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0), 5.0, float("nan")]]])
    valid = torch.tensor([[[True, True, False, True]]])
    logp = normalised_log_probs(logits, valid)
    # softmax over the two valid, finite codes: 1/4 and 3/4; the masked one and the NaN are -inf
    torch.testing.assert_close(logp[0, 0, :2], torch.tensor([math.log(0.25), math.log(0.75)]))
    assert torch.all(torch.isneginf(logp[0, 0, 2:]))
    assert torch.all(torch.isneginf(normalised_log_probs(logits, torch.zeros_like(valid))))


def test_unconstrained_search_scores_the_whole_codebook():
    K, L, m, W = 3, 2, 1, 9  # W = K^L: never prunes
    trie = PrefixTrie.from_sids(catalog(K, L, [0, 4]), K)  # a 2-item catalog the search ignores
    step = HashStep.random(1, K, W, seed=6)
    res = beam_search(step, trie, batch=1, session_len=m, beam_width=W, num_sessions=W, constrained=False)
    full = PrefixTrie.from_sids(catalog(K, L, list(range(K**L))), K)
    got = {tuple(res.sessions[0, r, 0].tolist()): float(res.scores[0, r]) for r in range(W)}
    assert len(got) == K**L
    for sid, score in got.items():
        assert score == pytest.approx(step.score(0, np.array([sid]), full), abs=1e-5)
    in_catalog = {(0, 0), (1, 1)}
    for r in range(W):
        sid = tuple(res.sessions[0, r, 0].tolist())
        assert (int(res.leaves[0, r, 0]) >= 0) == (sid in in_catalog)


def test_cancelled_search_stops():
    from onerec.decoding.beam import CancelledError

    trie = PrefixTrie.from_sids(catalog(3, 2, list(range(9))), 3)
    step = HashStep.random(1, 3, 4, seed=0)
    asked = []

    def cancel_after_two():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(CancelledError):
        beam_search(step, trie, 1, 2, 4, cancelled=cancel_after_two)
    assert len(step.calls) == 2
