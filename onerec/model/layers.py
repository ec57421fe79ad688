"""Transformer building blocks: attention, dense FFN, per-level heads, encoder and decoder layers."""

# Shapes: B batch/requests, W beams per request, N history positions, T decoder positions so far,
# S any sequence length, Q queries, D d_model, H heads, hd head dim (D / H), L levels, K codes, * any dims.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention bias from a key mask (B, N) bool, True = real -> (B, 1, 1, N).

    Padded keys get the dtype's most negative finite value, so their softmax weight underflows to exactly 0
    while a (forbidden) all-padded row still yields finite numbers instead of NaN. A float bias, built in
    the model's dtype, exports to ONNX as a plain Add (a bool mask would bring in float32 constants).
    """
    return blocked(mask, dtype)[:, None, None, :]


def blocked(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention bias of a bool `allowed` (any shape): 0 where allowed, the dtype's most negative finite
    value elsewhere."""
    return (~allowed).to(dtype) * torch.finfo(dtype).min


def older_only_bias(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, 1, n, n) additive bias of a causal encoder over a most-recent-first history: query i sees keys j >= i
    (itself and older items). Built from arange, so one traced graph serves every length."""
    idx = torch.arange(n, device=device)
    return blocked(idx[None, :] >= idx[:, None], dtype)[None, None]


def group_causal_bias(groups: int, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, 1, G*S, G*S) additive bias: position p sees q iff both lie in the same block of `size` and q <= p (the
    decoder of every target at once, each block one target's [BOS, codes])."""
    p = torch.arange(groups * size, device=device)
    allowed = (p[None, :] // size == p[:, None] // size) & (p[None, :] <= p[:, None])
    return blocked(allowed, dtype)[None, None]


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(*, S, D) -> (*, H, S, hd)."""
    return x.unflatten(-1, (n_heads, -1)).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """(*, H, S, hd) -> (*, S, D)."""
    return x.transpose(-3, -2).flatten(-2)


def attend(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: float, causal: bool = False
) -> Tensor:
    """Scaled dot-product attention. q (B', H, Q, hd), k/v (B', H, S, hd), bias broadcast to (B', H, Q, S)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=causal)


def attend_step(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Inference attention of a decode step, written out: q (B', H, Q, hd), k/v (B', H, S, hd), scale
    hd ** -0.5 (a Python float, so no shape arithmetic is exported) -> (B', H, Q, hd).

    Same values as `attend` without dropout, but the graph it exports reads K once: `q @ k^T` with only q
    scaled lets onnxruntime fuse the transpose into the MatMul, where SDPA's export scales K too and so
    materialises the whole transposed, scaled cache every step (12 % of a beam-128 request, PERFORMANCE.md).
    """
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B', H, Q, S)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(dim=-1), v)


class SelfAttention(nn.Module):
    """Multi-head self-attention, full-sequence (`forward`) or one position against a KV cache (`step`)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.scale = (d_model // n_heads) ** -0.5
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(*, S, D) -> q, k, v each (*, H, S, hd)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return split_heads(q, self.n_heads), split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def forward(self, x: Tensor, bias: Tensor | None = None, causal: bool = False) -> Tensor:
        """x (B, S, D), bias broadcast to (B, H, S, S) (e.g. (B, 1, 1, S)) or None -> (B, S, D)."""
        q, k, v = self.project(x)  # (B, H, S, hd)
        p = self.dropout if self.training else 0.0
        return self.out(merge_heads(attend(q, k, v, bias, p, causal)))

    def step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new position per beam: x (B, W, D), caches (B, W, H, T, hd).

        Returns the output (B, W, D) and the caches with this position appended, (B, W, H, T+1, hd). No mask
        is needed: the new position is the last one, so causal attention sees every cached key.
        """
        q, k, v = self.project(x.unsqueeze(-2))  # (B, W, H, 1, hd)
        k_all = torch.cat([k_cache, k], dim=-2)  # (B, W, H, T+1, hd)
        v_all = torch.cat([v_cache, v], dim=-2)
        o = attend_step(q.flatten(0, 1), k_all.flatten(0, 1), v_all.flatten(0, 1), self.scale)  # (B*W, H, 1, hd)
        o = merge_heads(o).reshape(x.shape)  # (B, W, D)
        return self.out(o), k_all, v_all


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries over the encoder memory of the same request."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.scale = (d_model // n_heads) ** -0.5
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, N, D) -> k, v each (B, H, N, hd). Computed once per request."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """x (B, Q, D) queries of one request (Q = T positions, or W beams at one position),
        k/v (B, H, N, hd), bias (B, 1, 1, N) -> (B, Q, D)."""
        q = split_heads(self.q(x), self.n_heads)  # (B, H, Q, hd)
        p = self.dropout if self.training else 0.0
        return self.out(merge_heads(attend(q, k, v, bias, p)))

    def step(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """`forward` for one decode step (inference, no dropout) through `attend_step`."""
        q = split_heads(self.q(x), self.n_heads)  # (B, H, W, hd)
        return self.out(merge_heads(attend_step(q, k, v, self.scale, bias)))


class FeedForward(nn.Module):
    """Dense GELU FFN: Linear(D, d_ff) -> GELU -> Linear(d_ff, D). Also the expert of the MoE."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(*, D) -> (*, D)."""
        return self.down(F.gelu(self.up(x)))


class LevelHeads(nn.Module):
    """L output heads, one Linear(D, K) per semantic-ID level, stacked as weight (L, K, D) and bias (L, K).

    Stacking lets the decoder pick the head of a position with a gather inside the graph instead of Python
    branching on the position (which ONNX tracing would freeze).
    """

    def __init__(self, levels: int, d_model: int, codes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(levels, codes, d_model))
        self.bias = nn.Parameter(torch.zeros(levels, codes))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, h: Tensor) -> Tensor:
        """h (B, m, L, D): the state at each item's level-l predicting position -> logits (B, m, L, K)."""
        return torch.einsum("bmld,lkd->bmlk", h, self.weight) + self.bias

    def select(self, h: Tensor, level: Tensor) -> Tensor:
        """h (B, W, D), level (1,) long in [0, L) -> logits (B, W, K) from head `level`."""
        w = self.weight.index_select(0, level).squeeze(0)  # (K, D)
        b = self.bias.index_select(0, level).squeeze(0)  # (K,)
        return F.linear(h, w, b)

    def select_candidates(self, h: Tensor, level: Tensor, candidates: Tensor) -> Tensor:
        """h (B, W, D), level (1,) long, candidates (Bc, G, C) codes with (Bc, G) one of (1, 1) (shared by
        all beams), (B, 1) (per request) or (B, W) (per beam) -> logits (B, W, C) of head `level` for those
        codes only. Only the candidates' head rows are read; the beams sharing a candidate list form one
        GEMM: (Bc, G, C, D) @ (Bc, G, D, R) with R = B*W / (Bc*G) beams per list (the small beam side is
        transposed, never the gathered rows)."""
        L, K, D = self.weight.shape
        B, W, _ = h.shape
        Bc, G, C = candidates.shape
        index = level * K + candidates  # (Bc, G, C) rows of the flattened (L*K, D) heads
        rows = self.weight.reshape(L * K, D)[index]  # (Bc, G, C, D)
        grouped = h.reshape(Bc, G, (B * W) // (Bc * G), D)  # (Bc, G, R, D): row-major beams per list
        logits = torch.matmul(rows, grouped.transpose(-1, -2))  # (Bc, G, C, R)
        logits = logits + self.bias.reshape(L * K)[index].unsqueeze(-1)
        return logits.transpose(-1, -2).reshape(B, W, C)


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: self-attention with key padding bias, then dense GELU FFN. `dropout` is on the
    residual branches, `attn_dropout` on the attention weights."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, attn_dropout)
        self.ln_ffn = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x (B, N, D), bias (B, 1, 1, N) or (B, 1, N, N) -> (B, N, D)."""
        x = x + self.drop(self.attn(self.ln_attn(x), bias))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal self-attention, cross-attention to memory, then a sparse FFN.

    `ffn` maps tokens (S, D) to (y (S, D), aux_loss scalar): the MoE (see `onerec.model.moe`), injected so
    this module does not depend on how experts are routed.
    """

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(d_model)
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout)
        self.ln_cross = nn.LayerNorm(d_model)
        self.cross_attn = CrossAttention(d_model, n_heads, attn_dropout)
        self.ln_ffn = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def _feed_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (*, D) -> residual output (*, D), aux loss."""
        h = self.ln_ffn(x)
        y, aux = self.ffn(h.reshape(-1, h.shape[-1]))  # tokens (S, D)
        return x + self.drop(y.reshape(x.shape)), aux

    def forward(self, x: Tensor, mem_k: Tensor, mem_v: Tensor, mem_bias: Tensor,
                self_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass: x (B, T, D), mem_k/v (B, H, N, hd), mem_bias (B, 1, 1, N) or (B, 1, T, N) -> x,
        aux. Self-attention is causal, or follows `self_bias` (1, 1, T, T) additive when given."""
        if self_bias is None:
            x = x + self.drop(self.self_attn(self.ln_self(x), causal=True))
        else:
            x = x + self.drop(self.self_attn(self.ln_self(x), self_bias))
        x = x + self.drop(self.cross_attn(self.ln_cross(x), mem_k, mem_v, mem_bias))
        return self._feed_forward(x)

    def step(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, mem_k: Tensor, mem_v: Tensor, mem_bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One position for W beams: x (B, W, D), caches (B, W, H, T, hd), mem_k/v (B, H, N, hd) shared by
        the W beams. Returns x (B, W, D) and the caches (B, W, H, T+1, hd)."""
        a, k_all, v_all = self.self_attn.step(self.ln_self(x), k_cache, v_cache)
        x = x + self.drop(a)
        x = x + self.drop(self.cross_attn.step(self.ln_cross(x), mem_k, mem_v, mem_bias))  # W queries per request
        x, _ = self._feed_forward(x)
        return x, k_all, v_all
