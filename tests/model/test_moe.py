"""Sparse MoE: one expert equals a dense FFN, pinned aux loss and combine weights, exact top-k routing."""

# Shapes: S tokens, D d_model, E experts, k experts per token.

import math

import pytest
import torch

from onerec.model.layers import FeedForward
from onerec.model.moe import MoEFeedForward, assignment_matrix, combine_slots, load_balancing_loss


def test_one_expert_top1_equals_dense_ffn() -> None:
    torch.manual_seed(0)
    dense = FeedForward(16, 32)
    moe = MoEFeedForward(16, 32, n_experts=1, top_k=1)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(40, 16)  # (S, D)
    y, aux = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-6, rtol=0)
    assert aux.item() == pytest.approx(1.0)  # one expert: f = P = 1


def _hand_gate_moe() -> tuple[MoEFeedForward, torch.Tensor]:
    """E=3, top-2, gate = identity, so the gate logits are the inputs: log-probabilities chosen by hand."""
    torch.manual_seed(0)
    moe = MoEFeedForward(3, 4, n_experts=3, top_k=2)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(3))
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))  # (S=2, D=3) -> probs exactly these
    return moe, x


def test_aux_loss_and_combine_weights_hand_computed() -> None:
    moe, x = _hand_gate_moe()
    routing = moe.route(x)
    torch.testing.assert_close(routing.probs, torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    assert routing.experts.tolist() == [[0, 1], [1, 2]]
    # top-2 probabilities renormalised: [.5, .3] / .8 and [.6, .3] / .9
    torch.testing.assert_close(routing.weights, torch.tensor([[0.625, 0.375], [2 / 3, 1 / 3]]))
    # f = [1, 2, 1] / 4 assignments, P = [.3, .45, .25]; aux = 3 * (.075 + .225 + .0625) = 1.0875
    _, aux = moe(x)
    assert aux.item() == pytest.approx(1.0875, abs=1e-6)
    assert load_balancing_loss(routing.probs, routing.experts).item() == pytest.approx(1.0875, abs=1e-6)


def test_output_is_weighted_sum_of_chosen_experts() -> None:
    moe, x = _hand_gate_moe()
    y, _ = moe(x)
    e = moe.experts
    expected = torch.stack([0.625 * e[0](x[0]) + 0.375 * e[1](x[0]), 2 / 3 * e[1](x[1]) + 1 / 3 * e[2](x[1])])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_each_token_runs_exactly_top_k_experts() -> None:
    torch.manual_seed(1)
    S, D, E, k = 50, 8, 4, 2
    moe = MoEFeedForward(D, 16, n_experts=E, top_k=k)
    x = torch.randn(S, D)
    routing = moe.route(x)
    assert torch.equal(assignment_matrix(routing.probs, routing.experts).sum(1), torch.full((S,), float(k)))
    rows = []
    hooks = [ex.register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[0])) for ex in moe.experts]
    moe(x)
    for h in hooks:
        h.remove()
    assert len(rows) == E and sum(rows) == S * k  # sparse dispatch: S*k expert rows, not S*E


def test_aux_loss_sends_gradient_to_gate() -> None:
    torch.manual_seed(2)
    moe = MoEFeedForward(8, 16, n_experts=4, top_k=2)
    _, aux = moe(torch.randn(30, 8))
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_uniform_routing_gives_aux_one() -> None:
    probs = torch.full((4, 2), 0.5)  # (S, E)
    experts = torch.tensor([[0], [1], [0], [1]])  # (S, k=1)
    assert math.isclose(load_balancing_loss(probs, experts).item(), 1.0)


def test_rejects_bad_top_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(4, 8, n_experts=2, top_k=3)


def test_combine_slots_sums_each_tokens_k_slots() -> None:
    # 3 tokens, top-2: slots in expert order name tokens 2, 0 | 1, 2 | 0, 1
    tokens = torch.tensor([2, 0, 1, 2, 0, 1])
    outs = torch.tensor([[1.0], [2.0], [4.0], [8.0], [16.0], [32.0]])  # (S*k, D=1)
    y = combine_slots(outs, tokens, top_k=2)
    assert torch.equal(y, torch.tensor([[2.0 + 16.0], [4.0 + 32.0], [1.0 + 8.0]]))
