"""Sparse mixture-of-experts FFN: softmax top-k gate, index dispatch, Switch-style load-balancing loss."""

# Shapes: S tokens (any batch/beam/position dims flattened), D d_model, E experts, k experts per token.

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from onerec.model.layers import FeedForward


class Routing(NamedTuple):
    """Where each token goes."""

    probs: Tensor  # (S, E) softmax gate probabilities
    experts: Tensor  # (S, k) long, the top-k experts of each token (distinct per token)
    weights: Tensor  # (S, k) combine weights: the top-k probabilities renormalised to sum 1 per token


def load_balancing_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e over the given tokens.

    f_e: fraction of all S*k token->expert assignments that go to e; P_e: mean gate probability of e.
    It is 1 when routing is perfectly uniform; `probs` carries the gradient (f_e is a count).
    """
    n_experts = probs.shape[-1]
    assigned = assignment_matrix(probs, experts)  # (S, E)
    f = assigned.sum(0) / experts.numel()  # (E,)
    p = probs.mean(0)  # (E,)
    return n_experts * (f * p).sum()


def assignment_matrix(probs: Tensor, experts: Tensor) -> Tensor:
    """(S, E) float, 1.0 where token s is routed to expert e, else 0.0."""
    return torch.zeros_like(probs).scatter(1, experts, torch.ones_like(experts, dtype=probs.dtype))


def combine_slots(outs: Tensor, tokens: Tensor, top_k: int) -> Tensor:
    """Expert outputs outs (S*k, D) of the token-slots `tokens` (S*k,), where every token of 0..S-1 appears
    exactly k times -> their per-token sums (S, D).

    A row gather by the slots' sort order and a sum over k, instead of a scatter-add per expert: onnxruntime's
    ScatterElements adds element by element, and eight of them took ~6 % of a beam-128 request on the CPU.
    """
    order = torch.argsort(tokens)  # (S*k,) each token's k slots become adjacent
    return outs.index_select(0, order).unflatten(0, (-1, top_k)).sum(1)  # (S, D)


class MoEFeedForward(nn.Module):
    """Top-k mixture of GELU FFN experts.

    y(x) = sum over the token's top-k experts e of w_e * expert_e(x), w = top-k softmax probabilities
    renormalised to sum 1 (so with top_k=1 the chosen expert's output is used unscaled, and with one expert
    the layer is exactly a dense FFN). Each expert runs only on the tokens routed to it (`nonzero` +
    `index_select`), never densely on all tokens. The expert loop is over a static count, so it traces.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must lie in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts = n_experts
        self.top_k = top_k
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, d_ff) for _ in range(n_experts))

    def route(self, x: Tensor) -> Routing:
        """x (S, D) -> the routing of every token."""
        probs = self.gate(x).softmax(dim=-1)  # (S, E)
        top_p, experts = probs.topk(self.top_k, dim=-1)  # (S, k)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return Routing(probs, experts, weights)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (S, D) -> y (S, D), aux load-balancing loss (scalar) over these S tokens."""
        routing = self.route(x)
        # combine[s, e]: weight of expert e for token s (0 where not routed); routed[s, e]: 1.0 where routed.
        combine = torch.zeros_like(routing.probs).scatter(1, routing.experts, routing.weights)  # (S, E)
        routed = assignment_matrix(routing.probs, routing.experts)  # (S, E)
        outs, slots = [], []
        for e, expert in enumerate(self.experts):
            tokens = (routed[:, e] > 0).nonzero().squeeze(1)  # (S_e,) tokens routed to e, each at most once
            w = combine[:, e].index_select(0, tokens).unsqueeze(1)  # (S_e, 1)
            outs.append(expert(x.index_select(0, tokens)) * w)  # (S_e, D)
            slots.append(tokens)
        y = combine_slots(torch.cat(outs), torch.cat(slots), self.top_k)  # (S, D)
        return y, load_balancing_loss(routing.probs, routing.experts)

    def expert_parameters(self) -> int:
        """Parameters of one expert (all experts have the same shape)."""
        return sum(p.numel() for p in self.experts[0].parameters())
