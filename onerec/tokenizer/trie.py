"""CSR prefix trie over the catalog's semantic IDs, used to constrain decoding to real items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixTrie:
    """Prefix trie of the unique SIDs, in CSR form.

    Level l (0..L-1) holds n_l nodes; n_0 = 1 (the root, node 0). The children of node j at level l are
    the level-(l+1) nodes offsets[l][j] .. offsets[l][j+1]-1, and their codes are codes[l][same range],
    ascending. Level-L nodes are leaves: leaf i is the i-th unique SID in lexicographic order, which is
    also its row in the catalog's inverted index.
    """

    offsets: tuple[np.ndarray, ...]  # L arrays; offsets[l]: (n_l + 1,) int64
    codes: tuple[np.ndarray, ...]  # L arrays; codes[l]: (n_{l+1},) int32
    num_codes: int  # K

    def __post_init__(self) -> None:
        # parents[l]: (n_{l+1},) the level-l parent of each level-(l+1) node; keys[l]: parent * K + code,
        # ascending across the whole level, so one searchsorted resolves many (node, code) pairs at once.
        parents = tuple(np.repeat(np.arange(len(o) - 1), np.diff(o)) for o in self.offsets)
        keys = tuple(p * self.num_codes + c.astype(np.int64) for p, c in zip(parents, self.codes, strict=True))
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "keys", keys)

    @property
    def levels(self) -> int:
        return len(self.codes)

    @property
    def num_leaves(self) -> int:
        return int(self.codes[-1].shape[0])

    @classmethod
    def from_sids(cls, unique_sids: np.ndarray, num_codes: int) -> PrefixTrie:
        """Build from unique SIDs (U, L) sorted lexicographically (as `np.unique(axis=0)` returns)."""
        sids = np.asarray(unique_sids, dtype=np.int64)
        if sids.ndim != 2 or sids.shape[0] == 0:
            raise ValueError("PrefixTrie needs a non-empty (U, L) array of SIDs")
        if np.any(sids < 0) or np.any(sids >= num_codes):
            raise ValueError(f"SIDs must lie in [0, {num_codes})")
        levels = sids.shape[1]
        offsets, codes = [], []
        parent = np.zeros(sids.shape[0], dtype=np.int64)  # node id of each SID's prefix at level l
        n_nodes = 1
        for level in range(levels):
            key = parent * num_codes + sids[:, level]
            first = np.ones(len(key), dtype=bool)
            first[1:] = key[1:] != key[:-1]  # sorted input: a new child starts where the key changes
            child_parent = parent[first]
            codes.append(sids[first, level].astype(np.int32))
            offsets.append(np.searchsorted(child_parent, np.arange(n_nodes + 1), side="left").astype(np.int64))
            parent = np.cumsum(first) - 1
            n_nodes = int(first.sum())
        return cls(offsets=tuple(offsets), codes=tuple(codes), num_codes=num_codes)

    def children(self, level: int, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes (c,) and level-(l+1) node ids (c,) of `node`'s children."""
        lo, hi = int(self.offsets[level][node]), int(self.offsets[level][node + 1])
        return self.codes[level][lo:hi], np.arange(lo, hi, dtype=np.int64)

    def child(self, level: int, node: int, code: int) -> int:
        """The child of `node` reached by `code`, or -1."""
        lo, hi = int(self.offsets[level][node]), int(self.offsets[level][node + 1])
        i = lo + int(np.searchsorted(self.codes[level][lo:hi], code))
        return i if i < hi and int(self.codes[level][i]) == code else -1

    def step(self, level: int, nodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Vectorised `child`: nodes (M,) at `level`, codes (M,) -> child ids (M,), -1 where absent."""
        nodes = np.asarray(nodes, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        out = np.full(nodes.shape, -1, dtype=np.int64)
        ok = (nodes >= 0) & (codes >= 0) & (codes < self.num_codes)  # else node*K + code names another node's child
        keys = self.keys[level]
        query = nodes[ok] * self.num_codes + codes[ok]
        pos = np.searchsorted(keys, query)
        pos_c = np.minimum(pos, len(keys) - 1)
        out[ok] = np.where(keys[pos_c] == query, pos_c, -1)
        return out

    def child_masks(self) -> tuple[np.ndarray, ...]:
        """Per level l, (n_l, K) bool: row j marks the codes of node j's children (the codes valid after it)."""
        masks = []
        for level in range(self.levels):
            mask = np.zeros((len(self.offsets[level]) - 1, self.num_codes), dtype=bool)
            mask[self.parents[level], self.codes[level]] = True
            masks.append(mask)
        return tuple(masks)

    def path_nodes(self, sids: np.ndarray) -> np.ndarray:
        """sids (M, L) -> (M, L) int64: column l is the level-l node whose children hold code l, i.e. the node
        of the first l codes (column 0 is the root); -1 from the level where the prefix leaves the trie."""
        sids = np.asarray(sids, dtype=np.int64).reshape(-1, self.levels)
        out = np.empty(sids.shape, dtype=np.int64)
        node = np.zeros(sids.shape[0], dtype=np.int64)
        for level in range(self.levels):
            out[:, level] = node
            node = self.step(level, node, sids[:, level])
        return out

    def leaf_of(self, sids: np.ndarray) -> np.ndarray:
        """Leaf ids (M,) of SIDs (M, L); -1 for SIDs not in the catalog."""
        sids = np.asarray(sids, dtype=np.int64).reshape(-1, self.levels)
        node = np.zeros(sids.shape[0], dtype=np.int64)
        for level in range(self.levels):
            node = self.step(level, node, sids[:, level])
        return node

    def leaf_sids(self) -> np.ndarray:
        """All leaves' SIDs (U, L), in leaf order."""
        levels = self.levels
        out = np.zeros((self.num_leaves, levels), dtype=np.int64)
        node = np.arange(self.num_leaves, dtype=np.int64)  # leaf ids; walk up to the root
        for level in range(levels - 1, -1, -1):
            out[:, level] = self.codes[level][node]
            node = self.parents[level][node]
        return out
