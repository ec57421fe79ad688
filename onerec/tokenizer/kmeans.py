"""Balanced k-means (OneRec Algorithm 1): every cluster ends with floor(N/K) or ceil(N/K) items."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from onerec.errors import UsageError

# Shapes legend: N items (points), K clusters (codes), d embedding dim, T candidate centroids kept per
# point, M centroid neighbours per centroid, U points still unassigned in a round, C chunk rows (tree
# init: cells), G point groups, B groups per block, S init sample points or the largest group in a block.

log = logging.getLogger(__name__)

KMEANS_PP_MAX_K = 1024  # "auto" init: k-means++ up to this K (its loop over K is cheap), a PCA tree beyond
KMEANS_PP_SAMPLE_PER_K = 32  # k-means++ seeds from at most this many points per centroid
TREE_MIN_SAMPLE = 65536  # tree init estimates split directions from max(N/8, this many) points


@dataclass(frozen=True)
class AssignStats:
    """What one capacity-constrained assignment cost (for logs and benchmarks)."""

    rounds: int  # propose/accept rounds
    refreshed: int  # points whose T candidates all filled up and were re-ranked against open centroids


@dataclass
class Candidates:
    """Each point's T nearest centroids, nearest first; rows are rewritten when a point exhausts them."""

    index: torch.Tensor  # (N, T) long centroid ids
    dist: torch.Tensor  # (N, T) float squared Euclidean distances


def check_k(k: int, n: int) -> None:
    """UsageError unless 1 <= k <= n."""
    if k < 1:
        raise UsageError(f"--codes: K={k} must be at least 1")
    if k > n:
        raise UsageError(f"--codes: K={k} is larger than the item count N={n}")


def cluster_capacities(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """(K,) long: Algorithm 1's |V|/K, the first N mod K clusters taking one extra item."""
    q, r = divmod(n, k)
    caps = torch.full((k,), q, dtype=torch.long, device=device)
    caps[:r] += 1
    return caps


def resolve_init(method: str, k: int) -> str:
    """"auto" -> "kmeans++" for K <= KMEANS_PP_MAX_K (its loop over K is cheap there), else "tree"."""
    if method == "auto":
        return "kmeans++" if k <= KMEANS_PP_MAX_K else "tree"
    if method not in ("kmeans++", "random", "tree"):
        raise ValueError(f"init: unknown method {method!r}; known: auto, kmeans++, random, tree")
    return method


def init_centroids(x: torch.Tensor, k: int, seed: int, method: str = "auto") -> torch.Tensor:
    """Initial centroids (K, d): seeded k-means++ ("kmeans++"), K distinct random points ("random"), or
    the means of `tree_assign` ("tree"); "auto" as `resolve_init`."""
    method = resolve_init(method, k)
    if method == "tree":
        return update_centroids(x, tree_assign(x, k, seed), k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = x.shape[0]
    if method == "random":
        pick = torch.randperm(n, generator=gen)[:k].to(x.device)
        return x[pick].clone()
    return _kmeans_plus_plus(x, k, gen)


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Arthur & Vassilvitskii seeding on a seeded subsample of at most KMEANS_PP_SAMPLE_PER_K * K points:
    each next centroid is drawn with probability proportional to its squared distance D^2."""
    n = x.shape[0]
    sample = min(n, KMEANS_PP_SAMPLE_PER_K * k)
    if sample < n:
        x = x[torch.randperm(n, generator=gen)[:sample].to(x.device)]
    xnorm = (x * x).sum(1)  # (S,)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(sample, (1,), generator=gen))
    uniforms = torch.rand(k, generator=gen, dtype=torch.float64)
    d2 = torch.full((sample,), float("inf"), dtype=x.dtype, device=x.device)  # (S,) D^2 to nearest chosen
    for i in range(k):
        if i > 0:
            cum = torch.cumsum(d2.double().cpu(), 0)  # (S,)
            total = float(cum[-1])
            if total > 0.0:
                chosen[i] = min(int(torch.searchsorted(cum, uniforms[i] * total, right=True)), sample - 1)
            else:  # every point already sits on a centroid: any unused point will do
                used = torch.zeros(sample, dtype=torch.bool)
                used[chosen[:i]] = True
                chosen[i] = int(torch.nonzero(~used)[0])
        c = x[int(chosen[i])]  # (d,)
        d2 = torch.minimum(d2, (xnorm - 2.0 * torch.mv(x, c) + xnorm[int(chosen[i])]).clamp_(min=0.0))
    return x[chosen.to(x.device)].clone()


def tree_assign(x: torch.Tensor, k: int, seed: int, power_iters: int = 2, sample: int = 8) -> torch.Tensor:
    """A balanced initial assignment (N,) by recursive bisection along each cell's principal direction.

    Cell c covers clusters [lo_c, hi_c) and holds exactly their total capacity; it splits at its
    approximate principal direction into the capacity of [lo, mid) and [mid, hi). Directions come from a
    seeded power iteration on a 1/`sample` subsample; ceil(log2 K) vectorised rounds of O(N d) work, so
    no N x K distances are needed to start Lloyd."""
    n, d = x.shape
    dev = x.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cum = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(cluster_capacities(n, k, dev), 0)])
    rows = torch.randperm(n, generator=gen)[: max(min(n, TREE_MIN_SAMPLE), n // sample)].to(dev)  # (S,)
    lo = torch.zeros(1, dtype=torch.long, device=dev)  # (C,) first cluster of each cell
    hi = torch.full((1,), k, dtype=torch.long, device=dev)  # (C,) one past its last cluster
    cell = torch.zeros(n, dtype=torch.long, device=dev)  # (N,)
    while bool((hi - lo > 1).any()):
        v = _principal_directions(x[rows], cell[rows], lo.shape[0], power_iters, gen)  # (C, d)
        proj = (x * v[cell]).sum(1)  # (N,) position along the own cell's direction
        mid = (lo + hi) // 2
        order = torch.argsort(proj, stable=True)
        order = order[torch.argsort(cell[order], stable=True)]  # grouped by cell, ascending projection
        left = torch.empty(n, dtype=torch.bool, device=dev)
        left[order] = _rank_within_groups(cell[order]) < (cum[mid] - cum[lo])[cell[order]]
        child_lo = torch.stack([lo, mid], 1).reshape(-1)  # (2C,) children 2c (left) and 2c+1 (right)
        child_hi = torch.stack([mid, hi], 1).reshape(-1)
        keep = child_hi > child_lo  # a one-cluster cell has an empty right child
        cell = (torch.cumsum(keep, 0) - 1)[2 * cell + (~left).long()]
        lo, hi = child_lo[keep], child_hi[keep]
    return lo[cell]


def _principal_directions(
    xs: torch.Tensor, cells: torch.Tensor, c: int, power_iters: int, gen: torch.Generator
) -> torch.Tensor:
    """Unit directions (C, d) of largest variance of the sample points xs (S, d) in each cell (power iteration
    from a seeded random start; a cell without sample points keeps its random direction)."""
    d = xs.shape[1]
    counts = torch.bincount(cells, minlength=c).clamp(min=1).unsqueeze(1).to(xs.dtype)  # (C, 1)
    centred = xs - (torch.zeros((c, d), dtype=xs.dtype, device=xs.device).index_add_(0, cells, xs) / counts)[cells]
    v = torch.randn((c, d), generator=gen).to(device=xs.device, dtype=xs.dtype)  # (C, d)
    for _ in range(power_iters):
        proj = (centred * v[cells]).sum(1, keepdim=True)  # (S, 1)
        w = torch.zeros((c, d), dtype=xs.dtype, device=xs.device).index_add_(0, cells, proj * centred)
        norm = w.norm(dim=1, keepdim=True)
        v = torch.where(norm > 1e-12, w / norm.clamp(min=1e-12), v)
    return v


def nearest_centroids(
    x: torch.Tensor, centroids: torch.Tensor, t: int, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's t nearest centroids, nearest first: index (N, t) long, squared distance (N, t).

    Chunked over points so N x K distances never exist at once; if K < t the last column repeats."""
    n, k = x.shape[0], centroids.shape[0]
    t_eff = min(t, k)
    cnorm = (centroids * centroids).sum(1)  # (K,)
    index = torch.empty((n, t), dtype=torch.long, device=x.device)
    dist = torch.empty((n, t), dtype=x.dtype, device=x.device)
    for lo in range(0, n, chunk):
        xb = x[lo : lo + chunk]  # (C, d)
        scores = torch.addmm(cnorm, xb, centroids.T, alpha=-2.0)  # (C, K) = |c|^2 - 2 x.c
        val, idx = torch.topk(scores, t_eff, dim=1, largest=False, sorted=True)  # (C, t_eff)
        val += (xb * xb).sum(1, keepdim=True)
        index[lo : lo + chunk, :t_eff] = idx
        dist[lo : lo + chunk, :t_eff] = val
    if t_eff < t:
        index[:, t_eff:] = index[:, t_eff - 1 : t_eff]
        dist[:, t_eff:] = dist[:, t_eff - 1 : t_eff]
    return index, dist


def local_candidates(
    x: torch.Tensor,
    centroids: torch.Tensor,
    group: torch.Tensor,
    group_neighbours: torch.Tensor,
    t: int,
    budget: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `nearest_centroids`, but point i only ranks the M centroids group_neighbours[group[i]].

    `group` (N,) in [0, G) and `group_neighbours` (G, M) centroid ids. Points are gathered group by
    group into padded (B, S, d) blocks (groups sorted by size, so padding stays small; B*S*max(d, M)
    <= budget floats) and ranked with one batched matmul per block: cost N*M*d instead of N*K*d."""
    n, m = x.shape[0], group_neighbours.shape[1]
    t_eff = min(t, m)
    xnorm = (x * x).sum(1)  # (N,)
    cnorm = (centroids * centroids).sum(1)  # (K,)
    members, counts, starts = _group_members(group, group_neighbours.shape[0])
    by_size = torch.argsort(counts, descending=True, stable=True)
    by_size = by_size[counts[by_size] > 0]
    index = torch.empty((n, t), dtype=torch.long, device=x.device)
    dist = torch.empty((n, t), dtype=x.dtype, device=x.device)
    lo = 0
    while lo < by_size.numel():
        size = int(counts[by_size[lo]])  # S: largest group in this block
        blk = by_size[lo : lo + max(1, budget // (size * max(x.shape[1], m)))]  # (B,)
        lo += blk.numel()
        offs = torch.arange(size, device=x.device)
        valid = offs.unsqueeze(0) < counts[blk].unsqueeze(1)  # (B, S)
        pts = members[(starts[blk].unsqueeze(1) + offs).clamp(max=n - 1)]  # (B, S) point ids
        nb = group_neighbours[blk]  # (B, M)
        # scores = |c|^2 - 2 x.c: (B, 1, M) + (B, S, d) @ (B, d, M) -> (B, S, M)
        scores = torch.baddbmm(cnorm[nb].unsqueeze(1), x[pts], centroids[nb].transpose(1, 2), alpha=-2.0)
        val, pos = torch.topk(scores, t_eff, dim=2, largest=False, sorted=True)  # (B, S, t_eff)
        ids = torch.gather(nb.unsqueeze(1).expand(-1, size, -1), 2, pos)  # (B, S, t_eff)
        rows = pts[valid]
        index[rows, :t_eff] = ids[valid]
        dist[rows, :t_eff] = val[valid] + xnorm[rows].unsqueeze(1)
    if t_eff < t:
        index[:, t_eff:] = index[:, t_eff - 1 : t_eff]
        dist[:, t_eff:] = dist[:, t_eff - 1 : t_eff]
    return index, dist


def _group_members(group: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point ids sorted by group (N,), group sizes (G,), and where each group starts in them (G,)."""
    counts = torch.bincount(group, minlength=g)
    members = torch.argsort(group, stable=True)
    return members, counts, torch.cumsum(counts, 0) - counts


def _rank_within_groups(keys: torch.Tensor) -> torch.Tensor:
    """For keys (U,) already sorted, each element's 0-based position inside its run of equal keys."""
    u = keys.shape[0]
    idx = torch.arange(u, device=keys.device)
    start = torch.ones(u, dtype=torch.bool, device=keys.device)
    start[1:] = keys[1:] != keys[:-1]
    run_start = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    return idx - run_start


def _refresh(
    x: torch.Tensor, centroids: torch.Tensor, is_open: torch.Tensor, rows: torch.Tensor, cand: Candidates
) -> None:
    """Re-rank `rows` (points whose candidates are all full) against the still-open centroids only."""
    open_ids = torch.nonzero(is_open).squeeze(1)  # (K_open,)
    idx, dist = nearest_centroids(x[rows], centroids[open_ids], cand.index.shape[1])
    cand.index[rows] = open_ids[idx]
    cand.dist[rows] = dist


def capacity_assign(
    x: torch.Tensor, centroids: torch.Tensor, cand: Candidates, capacity: torch.Tensor
) -> tuple[torch.Tensor, AssignStats]:
    """Assign points to centroids without exceeding `capacity` (K,), in vectorised rounds.

    Each round, every unassigned point proposes to its nearest still-open candidate; each centroid
    accepts its closest proposers up to its remaining capacity; full centroids close. A point whose T
    candidates are all closed is re-ranked against the open centroids. Every round assigns each
    proposer or closes its target, so it terminates. Returns assign (N,) long (-1 = left over once
    every centroid is full) and stats."""
    n, k = x.shape[0], centroids.shape[0]
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    cap = capacity.clone()
    active = torch.arange(n, device=x.device)  # (U,) unassigned point ids
    rounds = refreshed = 0
    while active.numel() > 0:
        is_open = cap > 0  # (K,)
        if not bool(is_open.any()):
            break
        options = cand.index[active]  # (U, T)
        ok = is_open[options]  # (U, T)
        has = ok.any(1)
        if not bool(has.all()):
            stale = active[~has]
            _refresh(x, centroids, is_open, stale, cand)
            options[~has] = cand.index[stale]
            ok[~has] = is_open[options[~has]]
            refreshed += int(stale.numel())
        first = ok.to(torch.uint8).argmax(1)  # (U,) first open candidate (argmax returns the first max)
        target = options.gather(1, first.unsqueeze(1)).squeeze(1)  # (U,)
        dist = cand.dist[active, first]  # (U,)
        order = torch.argsort(dist, stable=True)
        order = order[torch.argsort(target[order], stable=True)]  # grouped by target, closest first
        tgt = target[order]
        accept = _rank_within_groups(tgt) < cap[tgt]
        assign[active[order[accept]]] = tgt[accept]
        cap -= torch.bincount(tgt[accept], minlength=k)
        active = torch.sort(active[order[~accept]]).values
        rounds += 1
    return assign, AssignStats(rounds=rounds, refreshed=refreshed)


def balanced_assign(
    x: torch.Tensor, centroids: torch.Tensor, cand: Candidates
) -> tuple[torch.Tensor, AssignStats]:
    """Balanced assignment (N,): every cluster gets floor(N/K), then the N mod K left-over points go
    to distinct clusters (capacity 1 each), so sizes are floor(N/K) or ceil(N/K)."""
    n, k = x.shape[0], centroids.shape[0]
    q, r = divmod(n, k)
    base = torch.full((k,), q, dtype=torch.long, device=x.device)
    assign, stats = capacity_assign(x, centroids, cand, base)
    if r == 0:
        return assign, stats
    left = torch.nonzero(assign < 0).squeeze(1)  # (r,)
    sub = Candidates(index=cand.index[left], dist=cand.dist[left])
    extra, more = capacity_assign(x[left], centroids, sub, torch.ones(k, dtype=torch.long, device=x.device))
    assign[left] = extra
    return assign, AssignStats(rounds=stats.rounds + more.rounds, refreshed=stats.refreshed + more.refreshed)


def balanced_assignment(x: torch.Tensor, centroids: torch.Tensor, candidates: int = 8) -> torch.Tensor:
    """One balanced assignment step (N,) long of points x (N, d) to fixed centroids (K, d)."""
    check_k(centroids.shape[0], x.shape[0])
    index, dist = nearest_centroids(x, centroids, candidates)
    return balanced_assign(x, centroids, Candidates(index, dist))[0]


def update_centroids(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster means (K, d); balanced clusters are never empty."""
    sums = torch.zeros((k, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=k).clamp(min=1).to(x.dtype)
    return sums / counts.unsqueeze(1)


@dataclass(frozen=True)
class SearchOptions:
    """How many centroids each point ranks per iteration (the speed / exactness trade-off)."""

    candidates: int = 8  # T: ranked candidates kept per point
    neighbours: int = 64  # M: once an assignment exists, rank the M nearest centroids of the current one

    def __post_init__(self) -> None:
        for name in ("candidates", "neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"balanced_kmeans: {name} must be >= 1, got {getattr(self, name)}")


def rank_candidates(
    x: torch.Tensor,
    centroids: torch.Tensor,
    assign: torch.Tensor | None,
    opts: SearchOptions,
) -> Candidates:
    """Each point's ranked candidate centroids for one Lloyd iteration (see `balanced_kmeans`)."""
    if assign is None or opts.neighbours >= centroids.shape[0]:
        return Candidates(*nearest_centroids(x, centroids, opts.candidates))
    graph, _ = nearest_centroids(centroids, centroids, opts.neighbours)  # (K, M) centroid neighbour graph
    return Candidates(*local_candidates(x, centroids, assign, graph, opts.candidates))


def balanced_kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    seed: int,
    device: str | torch.device | None = None,
    *,
    candidates: int = 8,
    neighbours: int = 64,
    init: str = "auto",
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced Lloyd k-means: centroids (K, d) and assignment (N,) long with every cluster of size
    floor(N/K) or ceil(N/K) (OneRec Algorithm 1 semantics, vectorised).

    Init (`init`, see `resolve_init`): k-means++ centroids for small K; for large K a balanced PCA-tree
    partition (`tree_assign`), so no N x K pass is ever needed. Each iteration, every point ranks its
    `candidates` nearest centroids: exactly (chunked, N x K) when there is no assignment yet or
    K <= `neighbours`, otherwise among the `neighbours` nearest centroids of its current centroid
    (grouped batched matmul, N x M). The balanced assignment then runs in vectorised rounds
    (`capacity_assign`); points that exhaust their candidates are re-ranked exactly against the
    still-open centroids. Stops early once at most a `tol`
    fraction of the points change cluster. The returned centroids are the means of the returned
    assignment."""
    n = x.shape[0]
    check_k(k, n)
    if iters < 1:
        raise UsageError(f"--iters: must be at least 1, got {iters}")
    opts = SearchOptions(candidates=candidates, neighbours=neighbours)
    dev = torch.device(device) if device is not None else x.device
    x = x.to(device=dev, dtype=torch.float32).contiguous()  # (N, d)
    assign: torch.Tensor | None = None  # (N,)
    if resolve_init(init, k) == "tree":
        assign = tree_assign(x, k, seed)
        centroids = update_centroids(x, assign, k)  # (K, d)
    else:
        centroids = init_centroids(x, k, seed, init)
    for it in tqdm(range(iters), desc=f"balanced k-means K={k}", leave=False, disable=None):
        cand = rank_candidates(x, centroids, assign, opts)
        new_assign, stats = balanced_assign(x, centroids, cand)
        changed = n if assign is None else int((new_assign != assign).sum())
        assign = new_assign
        centroids = update_centroids(x, assign, k)
        log.debug("iter %d: %d rounds, %d refreshed, %d changed", it, stats.rounds, stats.refreshed, changed)
        if changed <= tol * n:
            break
    return centroids, assign


def balanced_kmeans_sequential(
    x: torch.Tensor, k: int, iters: int, seed: int, init: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """OneRec Algorithm 1, literally: for each cluster in turn, take its |V|/K nearest unassigned items
    and move its centroid to their mean. A reference for tests and the benchmark peer (loops over K)."""
    n = x.shape[0]
    check_k(k, n)
    if iters < 1:
        raise UsageError(f"--iters: must be at least 1, got {iters}")
    x = x.to(device="cpu", dtype=torch.float32)
    centroids = init_centroids(x, k, seed, init)
    caps = cluster_capacities(n, k).tolist()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new_assign = torch.full((n,), -1, dtype=torch.long)
        unassigned = torch.arange(n)
        for c in range(k):
            d2 = ((x[unassigned] - centroids[c]) ** 2).sum(1)  # (|U|,)
            take = torch.topk(d2, caps[c], largest=False, sorted=False).indices
            members = unassigned[take]
            new_assign[members] = c
            centroids[c] = x[members].mean(0)
            keep = torch.ones(unassigned.numel(), dtype=torch.bool)
            keep[take] = False
            unassigned = unassigned[keep]
        converged = bool((new_assign == assign).all())
        assign = new_assign
        if converged:
            break
    return centroids, assign
