"""OneRecModel: KV-cached decoding equals the full pass (with beams), padding invariance, shared cross K/V,
traceable decode_step, save/load, and training gradients."""

# Shapes: B batch, W beams, N history positions, T decoder positions, m items, L levels, K codes,
# D d_model, H heads, hd head dim.

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onerec.config import PRESETS, ModelConfig
from onerec.errors import UsageError
from onerec.model.onerec import (
    DecodeState,
    OneRecModel,
    attribute_grid,
    count_parameters,
    item_rows,
    load_model,
    node_offsets,
    node_rows,
    save_model,
    target_prefixes,
)

CFG: ModelConfig = PRESETS["tiny"].model
L, K, M = CFG.levels, CFG.codes, CFG.session_len
GARBAGE = 12345  # fed at BOS positions and padded history slots: must be ignored


NODE_BUCKETS = 1024  # tiny: K + K^2 + K^3 = 584 paths, so every trie node has its own row


def make_model(seed: int = 0, **overrides: object) -> OneRecModel:
    """A tiny model; with node_buckets the node table gets trained-like (non-zero) rows, so it matters."""
    torch.manual_seed(seed)
    model = OneRecModel(dataclasses.replace(CFG, **overrides)).eval()
    with torch.no_grad():
        if model.node_table is not None:
            model.node_table.weight.normal_()
            model.node_bias.normal_()
        if model.decoder_gate is not None:
            model.decoder_gate.fill_(0.5)  # trained-like: both the user vector and the decoder count
    return model


def make_history(lengths: list[int], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories (B, N, L) with `lengths` real items each, garbage in the padding, and masks (B, N)."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, K, (len(lengths), n, L), generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(mask[..., None], history, GARBAGE), mask


def make_targets(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random sessions (*shape, m, L)."""
    return torch.randint(0, K, (*shape, M, L), generator=torch.Generator().manual_seed(seed))


def input_token(targets: torch.Tensor, p: int) -> torch.Tensor:
    """The decoder input at position p for sessions (*, m, L) -> (*): garbage at BOS, else the code."""
    level_in = p % (L + 1)
    if level_in == 0:
        return torch.full(targets.shape[:-2], GARBAGE)
    return targets[..., p // (L + 1), level_in - 1]


def predicted_slot(p: int) -> tuple[int, int] | None:
    """(item, level) whose code position p's output predicts, or None when the next token is BOS."""
    level = p % (L + 1)
    return None if level == L else (p // (L + 1), level)


def reference_logits(model: OneRecModel, history, mask, targets: torch.Tensor) -> torch.Tensor:
    """Full teacher-forced logits for per-beam sessions targets (B, W, m, L) -> (B, W, m, L, K)."""
    B, W = targets.shape[:2]
    out = model(history.repeat_interleave(W, 0), mask.repeat_interleave(W, 0), targets.flatten(0, 1))
    return out.logits.unflatten(0, (B, W))


@torch.no_grad()
def test_kv_cached_decoding_equals_full_forward_with_padded_histories() -> None:
    model = make_model()
    history, mask = make_history([9, 4, 1], n=9)
    targets = make_targets((3,), seed=1)  # (B, m, L)
    full = model(history, mask, targets).logits  # (B, m, L, K)
    state = model.init_state(model.encode(history, mask), mask, beams=1)
    for p in range(CFG.decoder_len):
        assert state.self_k.shape[-2] == p
        logits, state = model.decode_step(input_token(targets, p)[:, None], state)  # (B, W=1, K)
        slot = predicted_slot(p)
        if slot is not None:
            torch.testing.assert_close(logits[:, 0], full[:, slot[0], slot[1]], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("extra", [{}, {"node_buckets": NODE_BUCKETS},
                                   {"node_buckets": NODE_BUCKETS, "user_skip": True, "causal_encoder": True}])
def test_kv_cached_beams_with_reordering_equal_full_forward(extra: dict) -> None:
    """With a node table the beams' prefixes must follow the reorders too (DecodeState.prefix); with user_skip
    every step adds the user vector (DecodeState.user)."""
    model = make_model(**extra)
    history, mask = make_history([6, 3], n=6, seed=2)
    B, W = 2, 3
    # Beams reorder before positions 6 and 13 (mid-item), with repeated and dropped parents.
    reorders = {6: torch.tensor([[2, 0, 0], [1, 2, 1]]), 13: torch.tensor([[1, 1, 2], [0, 2, 1]])}
    code_pos = torch.arange(M)[:, None] * (L + 1) + torch.arange(L)[None, :] + 1  # (m, L) input position
    sessions = make_targets((B, W), seed=3)  # (B, W, m, L): what each beam holds now
    reference = reference_logits(model, history, mask, sessions)
    state = model.init_state(model.encode(history, mask), mask, beams=W)
    for p in range(CFG.decoder_len):
        beam_idx = reorders.get(p)
        if beam_idx is not None:  # beam w continues parent beam_idx[b, w]; positions >= p are fresh tokens
            parents = sessions[torch.arange(B)[:, None], beam_idx]
            fresh = make_targets((B, W), seed=100 + p)
            sessions = torch.where(code_pos < p, parents, fresh)
            reference = reference_logits(model, history, mask, sessions)
        logits, state = model.decode_step(input_token(sessions, p), state, beam_idx)  # (B, W, K)
        slot = predicted_slot(p)
        if slot is not None:
            torch.testing.assert_close(logits, reference[:, :, slot[0], slot[1]], atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_does_not_change_encoder_or_decoder_outputs() -> None:
    model = make_model()
    history, mask = make_history([5, 2], n=5, seed=4)
    extra = torch.randint(0, K, (2, 4, L))
    longer = torch.cat([history, extra], dim=1)  # (B, N+4, L)
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(
        model.encode(longer, longer_mask)[:, :5], model.encode(history, mask), atol=1e-6, rtol=0
    )
    targets = make_targets((2,), seed=5)
    torch.testing.assert_close(
        model(longer, longer_mask, targets).logits, model(history, mask, targets).logits, atol=1e-6, rtol=0
    )


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 128])
def test_cross_kv_have_no_beam_dimension_and_beams_share_them(beams: int) -> None:
    model = make_model()
    history, mask = make_history([7, 3], n=7, seed=6)
    targets = make_targets((2,), seed=7)
    state = model.init_state(model.encode(history, mask), mask, beams=beams)
    layers, H, hd = CFG.decoder_layers, CFG.n_heads, CFG.head_dim
    assert state.cross_k.shape == state.cross_v.shape == (layers, 2, H, 7, hd)
    assert state.self_k.shape == (layers, 2, beams, H, 0, hd)
    full = model(history, mask, targets).logits
    for p in range(L + 2):
        tokens = input_token(targets, p)[:, None].expand(2, beams)  # every beam holds the same session
        beam_idx = torch.randint(0, beams, (2, beams))  # any parent: all beams are identical
        logits, state = model.decode_step(tokens, state, beam_idx)
        assert logits.shape == (2, beams, K)
        assert state.self_k.shape == (layers, 2, beams, H, p + 1, hd)
        assert state.cross_k.shape == (layers, 2, H, 7, hd)
        slot = predicted_slot(p)
        if slot is not None:
            expected = full[:, slot[0], slot[1]][:, None].expand_as(logits)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_beam_idx_can_grow_the_beam_count() -> None:
    model = make_model()
    history, mask = make_history([4, 2], n=4, seed=8)
    state = model.init_state(model.encode(history, mask), mask, beams=1)
    _, state = model.decode_step(torch.zeros(2, 1, dtype=torch.long), state)  # BOS, one beam
    tokens = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    logits, state = model.decode_step(tokens, state, torch.zeros(2, 4, dtype=torch.long))
    assert logits.shape == (2, 4, K) and state.self_k.shape[2] == 4


@torch.no_grad()
def test_traced_decode_step_generalises_across_positions_and_shapes() -> None:
    """`torch.onnx.export(dynamo=False)` traces: one trace must serve every position, batch and beam count
    (with a node table, whose rows depend on the position's level and the beams' prefixes)."""
    model = make_model(node_buckets=NODE_BUCKETS)

    class Step(torch.nn.Module):  # the flat tensor signature an ONNX graph has
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens, self_k, self_v, cross_k, cross_v, memory_mask, prefix, beam_idx):
            state = DecodeState(self_k, self_v, cross_k, cross_v, memory_mask, prefix)
            logits, new = self.model.decode_step(tokens, state, beam_idx)
            return logits, new.self_k, new.self_v

    def state_at(B: int, N: int, W: int, T: int, seed: int) -> DecodeState:
        history, mask = make_history([N] + [max(1, N // 2)] * (B - 1), n=N, seed=seed)
        state = model.init_state(model.encode(history, mask), mask, beams=W)
        for _ in range(T):
            state = model.decode_step(torch.randint(0, K, (B, W)), state)[1]
        return state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation notices
        warnings.simplefilter("error", torch.jit.TracerWarning)  # a frozen Python value is a failure
        example = (torch.zeros(2, 3, dtype=torch.long), *state_at(2, 5, 3, 1, 0)[:6], torch.zeros(2, 3).long())
        traced = torch.jit.trace(Step(), example)
    for B, N, W, T in [(1, 4, 5, 0), (3, 9, 2, 6), (2, 7, 4, CFG.decoder_len - 1)]:
        state = state_at(B, N, W, T, seed=T)
        tokens, beam_idx = torch.randint(0, K, (B, W)), torch.randint(0, W, (B, W))
        logits, self_k, _ = traced(tokens, *state[:6], beam_idx)
        eager_logits, eager_state = model.decode_step(tokens, state, beam_idx)
        torch.testing.assert_close(logits, eager_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(self_k, eager_state.self_k, atol=1e-6, rtol=0)


def test_save_load_round_trip_gives_identical_logits(tmp_path) -> None:
    model = make_model(seed=3)
    history, mask = make_history([5, 2], n=5, seed=9)
    targets = make_targets((2,), seed=10)
    save_model(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["codes"] == CFG.codes
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(history, mask, targets).logits, model(history, mask, targets).logits)


def test_load_rejects_missing_corrupt_and_mismatched_files(tmp_path) -> None:
    with pytest.raises(UsageError, match="model.json"):
        load_model(tmp_path)
    save_model(make_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="model.safetensors"):
        load_model(tmp_path)
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UsageError, match="model.safetensors"):
        load_model(tmp_path)
    weights.write_bytes(good)
    config = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**config, "d_model": 64, "d_ff": 32}))
    with pytest.raises(UsageError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(UsageError, match="model.json"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**config, "bogus": 1}))
    with pytest.raises(UsageError, match="model.json"):
        load_model(tmp_path)
    weights.unlink()
    (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="model.safetensors"):
        load_model(tmp_path)


def test_backward_reaches_every_parameter_and_aux_reaches_the_gate() -> None:
    model = make_model(dropout=0.1).train()
    history, mask = make_history([6, 3], n=6, seed=11)
    targets = make_targets((2,), seed=12)
    out = model(history, mask, targets)
    assert out.logits.shape == (2, M, L, K) and out.aux_loss.dim() == 0
    loss = F.cross_entropy(out.logits.flatten(0, 2), targets.flatten()) + CFG.aux_loss_coef * out.aux_loss
    loss.backward()
    assert torch.isfinite(loss)
    gate = model.decoder[0].ffn.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    model.zero_grad()
    model(history, mask, targets).aux_loss.backward()
    assert gate.grad.abs().sum() > 0


def test_forward_rejects_bad_targets() -> None:
    model = make_model()
    history, mask = make_history([2], n=2)
    with pytest.raises(ValueError, match="targets"):
        model(history, mask, torch.zeros(1, M, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="items"):
        model(history, mask, torch.zeros(1, M + 1, L, dtype=torch.long))


def test_count_parameters() -> None:
    model = make_model()
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert = 2 * CFG.d_model * CFG.d_ff + CFG.d_ff + CFG.d_model
    inactive = CFG.decoder_layers * (CFG.n_experts - CFG.top_k) * expert
    assert counts["active_per_token"] == counts["total"] - inactive
    dense = count_parameters(make_model(n_experts=1, top_k=1))
    assert dense["active_per_token"] == dense["total"]


def test_same_seed_same_weights() -> None:
    a, b = make_model(seed=7), make_model(seed=7)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


@torch.no_grad()
@pytest.mark.parametrize("node_buckets", [0, NODE_BUCKETS])
@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 4, 3), (2, 1, 6), (1, 1, K)])
def test_candidate_logits_equal_gathered_full_logits(shape, node_buckets) -> None:
    """Scoring only the candidates' head (and node) rows gives exactly the full logits at those codes."""
    from onerec.decoding.beam import gather_candidates

    model = make_model(node_buckets=node_buckets)
    history, mask = make_history([4, 2], n=4, seed=3)
    state = model.init_state(model.encode(history, mask), mask, beams=4)
    tokens = torch.randint(0, K, (2, 4))
    for _ in range(2):  # positions 0 and 1: heads 0 and 1
        candidates = torch.randint(0, K, shape)
        full, _ = model.decode_step(tokens, state)
        part, state = model.decode_step(tokens, state, candidates=candidates)
        assert part.shape == (2, 4, shape[-1])
        torch.testing.assert_close(part, gather_candidates(full, candidates), rtol=1e-5, atol=1e-6)


def test_item_rows_are_the_sid_in_base_k_mixed_and_a_bijection_when_buckets_cover_k_to_the_l() -> None:
    cfg = dataclasses.replace(CFG, item_buckets=K**L)  # tiny: K=8, L=3 -> 512 rows
    # (1, 2, 3) is 1*64 + 2*8 + 3 = 83 in base 8; 83 * 40503 % 512 = 469 (worked by hand)
    assert int(item_rows(torch.tensor([1, 2, 3]), cfg)) == 469
    every = torch.cartesian_prod(*[torch.arange(K)] * L)  # (K^L, L) every SID
    assert torch.unique(item_rows(every, cfg)).numel() == K**L  # one row per SID, no collision
    small = dataclasses.replace(cfg, item_buckets=100)
    rows = item_rows(every, small)
    assert int(rows.min()) >= 0 and int(rows.max()) < 100


@torch.no_grad()
def test_item_table_starts_at_zero_and_then_changes_only_histories_holding_its_item() -> None:
    with_table = make_model(item_buckets=K**L)
    plain = OneRecModel(CFG).eval()
    missing, unexpected = plain.load_state_dict(with_table.state_dict(), strict=False)
    assert not missing and unexpected == ["item_table.weight"]
    history, mask = make_history([5, 3], n=5, seed=21)  # garbage in the padding must not index the table
    torch.testing.assert_close(with_table.encode(history, mask), plain.encode(history, mask), rtol=0, atol=0)
    # one item's row set: a history holding that item changes, one without it does not
    item = history[0, 0]
    with_table.item_table.weight[item_rows(item, with_table.cfg)] = 1.0
    other = history.clone()
    other[1, :3] = torch.where((other[1, :3] == item).all(-1, keepdim=True), (item + 1) % K, other[1, :3])
    changed = with_table.encode(history, mask)[0]
    unchanged = with_table.encode(other, mask)[1]
    assert not torch.allclose(changed, plain.encode(history, mask)[0])
    torch.testing.assert_close(unchanged, plain.encode(other, mask)[1], rtol=0, atol=1e-6)


def test_item_table_gets_gradients_only_on_the_rows_of_real_history_items() -> None:
    model = make_model(item_buckets=K**L).train()
    history, mask = make_history([4, 2], n=4, seed=31)
    targets = make_targets((2,), seed=32)
    out = model(history, mask, targets)
    F.cross_entropy(out.logits.flatten(0, 2), targets.flatten()).backward()
    touched = set(torch.nonzero(model.item_table.weight.grad.abs().sum(-1)).flatten().tolist())
    real = set(item_rows(history[mask], model.cfg).tolist())
    assert touched == real


def test_attribute_grid_lists_each_items_attributes_at_its_item_row() -> None:
    cfg = dataclasses.replace(CFG, item_buckets=K**L, attribute_rows=6, attributes_per_item=2)
    grid = attribute_grid(np.array([[1, 2, 3], [0, 0, 1]]), [[4, 5, 1], []], cfg)  # a list past A is cut
    assert grid.shape == (K**L, 2)
    assert grid[469].tolist() == [4, 5]  # (1, 2, 3) -> row 469 (worked by hand above)
    assert np.count_nonzero(grid) == 2  # (0, 0, 1) has no attribute; no other row holds one


@torch.no_grad()
def test_item_attributes_add_exactly_their_rows_to_the_items_encoder_input() -> None:
    model = make_model(item_buckets=K**L, attribute_rows=4, attributes_per_item=2)
    assert float(model.attribute_table.weight[0].abs().sum()) == 0.0  # the padding row adds nothing
    history, mask = make_history([5, 3], n=5, seed=41)
    first, second = history[0, 0], history[0, 1]
    if bool((first == second).all()):
        second = (first + 1) % K
        history[0, 1] = second
    grid = attribute_grid(torch.stack([first, second]).numpy(), [[1, 3], [2]], model.cfg)
    inputs: list[torch.Tensor] = []
    hook = model.drop.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    model.encode(history, mask)  # all attribute rows 0: the plain input
    model.set_item_attributes(torch.as_tensor(grid))
    model.encode(history, mask)
    hook.remove()
    table = model.attribute_table.weight
    expected = torch.zeros_like(inputs[0])
    for b in range(2):
        for n in range(int(mask[b].sum())):
            if bool((history[b, n] == first).all()):
                expected[b, n] = table[1] + table[3]
            elif bool((history[b, n] == second).all()):
                expected[b, n] = table[2]
    real = mask[..., None].to(expected.dtype)  # padded slots read code 0's row: masked out of attention anyway
    torch.testing.assert_close((inputs[1] - inputs[0]) * real, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="must lie in"):
        model.set_item_attributes(torch.full_like(model.item_attribute_ids, 4))
    with pytest.raises(ValueError, match="needs item_buckets"):
        OneRecModel(dataclasses.replace(CFG, attribute_rows=4, attributes_per_item=2))


def test_node_rows_are_the_path_in_base_k_past_a_level_offset_and_a_bijection_over_every_trie_node() -> None:
    cfg = dataclasses.replace(CFG, node_buckets=NODE_BUCKETS)
    offsets = node_offsets(cfg)
    assert offsets.tolist() == [0, 8, 72]  # K=8: level 1 paths start after the 8 first codes, level 2 after 8 + 64
    # child 3 of prefix (1, 2): path 1*64 + 2*8 + 3 = 83, key 83 + 72 = 155, row 155 * 40503 % 1024 = 845 (by hand)
    assert int(node_rows(torch.tensor(1 * K + 2), torch.tensor(3), offsets[2], cfg)) == 845
    assert int(node_rows(torch.tensor(0), torch.tensor(5), offsets[0], cfg)) == 5 * 40503 % 1024 == 787
    rows = []
    for level in range(L):
        paths = torch.arange(K**level)  # every prefix of this level (as a folded number)
        rows.append(node_rows(paths[:, None], torch.arange(K), offsets[level], cfg).flatten())
    every = torch.cat(rows)
    assert every.numel() == K + K**2 + K**3 and torch.unique(every).numel() == every.numel()


def test_target_prefixes_fold_the_codes_before_each_level() -> None:
    targets = torch.tensor([[[1, 2, 3]]])  # (B=1, m=1, L=3)
    assert target_prefixes(targets, CFG).tolist() == [[[0, 1, 1 * K + 2]]]
    last = target_prefixes(targets, CFG)[..., -1] * K + targets[..., -1]  # the whole path = the item's flat SID
    assert int(last) == 83


@torch.no_grad()
def test_node_table_starts_at_zero_so_a_fresh_model_scores_as_one_without_it() -> None:
    torch.manual_seed(0)
    with_nodes = OneRecModel(dataclasses.replace(CFG, node_buckets=NODE_BUCKETS)).eval()
    plain = OneRecModel(CFG).eval()
    missing, unexpected = plain.load_state_dict(with_nodes.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["node_bias", "node_table.weight"]
    history, mask = make_history([5, 3], n=5, seed=41)
    targets = make_targets((2,), seed=42)
    torch.testing.assert_close(with_nodes(history, mask, targets).logits, plain(history, mask, targets).logits,
                               rtol=0, atol=0)


def test_node_table_gets_gradients_only_on_the_children_of_the_true_prefixes() -> None:
    model = make_model(node_buckets=NODE_BUCKETS).train()
    history, mask = make_history([4, 2], n=4, seed=51)
    targets = make_targets((2,), seed=52)  # (B, m, L)
    out = model(history, mask, targets)
    F.cross_entropy(out.logits.flatten(0, 2), targets.flatten()).backward()
    touched = set(torch.nonzero(model.node_table.weight.grad.abs().sum(-1)).flatten().tolist())
    prefix = target_prefixes(targets, model.cfg)  # (B, m, L)
    children = node_rows(prefix[..., None], torch.arange(K), model.node_offsets[:, None], model.cfg)
    assert touched == set(children.flatten().tolist())  # each level's softmax: every child of the true prefix


def test_a_model_with_a_node_table_refuses_to_decode_without_prefixes() -> None:
    model = make_model(node_buckets=NODE_BUCKETS)
    history, mask = make_history([3], n=3, seed=61)
    state = model.init_state(model.encode(history, mask), mask, beams=2)._replace(prefix=None)
    with pytest.raises(ValueError, match="prefixes"):
        model.decode_step(torch.zeros(1, 2, dtype=torch.long), state)


@torch.no_grad()
def test_causal_encoder_state_of_an_item_ignores_every_more_recent_item() -> None:
    model = make_model(causal_encoder=True)
    history, mask = make_history([6, 4], n=6, seed=71)
    changed = history.clone()
    changed[:, :2] = (changed[:, :2] + 1) % K  # the two most recent items of every row
    before, after = model.encode(history, mask), model.encode(changed, mask)
    real = mask[:, 2:]
    torch.testing.assert_close(after[:, 2:][real], before[:, 2:][real], rtol=0, atol=0)  # older states: same
    assert not torch.allclose(after[:, :2], before[:, :2])
    plain = make_model()  # the bidirectional encoder: every state reads the most recent items
    assert not torch.allclose(plain.encode(changed, mask)[:, 2:][real], plain.encode(history, mask)[:, 2:][real])


def every_position_targets(history: torch.Tensor, first: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from onerec.train.ntp import position_targets

    return position_targets(history, mask, first).clamp_min(0)


@torch.no_grad()
@pytest.mark.parametrize("extra", [{}, {"node_buckets": NODE_BUCKETS},
                                   {"node_buckets": NODE_BUCKETS, "user_skip": True}])
def test_forward_positions_target_0_equals_the_one_target_forward(extra: dict) -> None:
    model = make_model(causal_encoder=True, **extra)
    history, mask = make_history([6, 3, 1], n=6, seed=72)
    first = make_targets((3,), seed=73)[:, :1]  # (B, 1, L) the item after the most recent
    every = model.forward_positions(history, mask, every_position_targets(history, first, mask)).logits
    assert every.shape == (3, 6, L, K)
    torch.testing.assert_close(every[:, 0], model(history, mask, first).logits[:, 0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_forward_positions_target_n_reads_only_item_n_and_older() -> None:
    """Changing the most recent item changes target 0 (its decoder reads that state) and target 1 (the item is
    its target), and no later target: each decoder block sees encoder states n.. only, and only its own block."""
    model = make_model(causal_encoder=True, node_buckets=NODE_BUCKETS)
    history, mask = make_history([6, 5], n=6, seed=74)
    first = make_targets((2,), seed=75)[:, :1]
    changed = history.clone()
    changed[:, 0] = (changed[:, 0] + 1) % K
    a = model.forward_positions(history, mask, every_position_targets(history, first, mask)).logits
    b = model.forward_positions(changed, mask, every_position_targets(changed, first, mask)).logits
    real = mask[:, 2:]
    # Not bit-equal: the MoE gathers each expert's tokens, so a changed token regroups the expert matmuls and the
    # BLAS kernel may sum in another order (a few ulp on CI's CPU). A read of the changed state moves logits by
    # far more than 1e-5 (the last line).
    torch.testing.assert_close(b[:, 2:][real], a[:, 2:][real], rtol=0, atol=1e-5)
    assert (b[:, 0] - a[:, 0]).abs().max() > 1e-3 and (b[:, 1] - a[:, 1]).abs().max() > 1e-3


def test_forward_positions_refuses_a_bidirectional_encoder() -> None:
    model = make_model()
    history, mask = make_history([3], n=3, seed=76)
    with pytest.raises(ValueError, match="causal_encoder"):
        model.forward_positions(history, mask, history)


@torch.no_grad()
def test_user_skip_adds_the_most_recent_items_state_to_every_levels_state() -> None:
    """Hand-built: with the decoder's output zeroed (its last LayerNorm at weight 0, bias 0) and no node table, the
    logits are exactly the level heads applied to memory[:, 0], the user vector, at every level; without
    user_skip they are the heads' biases only."""
    model = make_model(user_skip=True)
    model.dec_norm.weight.zero_()
    history, mask = make_history([5, 2], n=5, seed=81)
    targets = make_targets((2,), seed=82)[:, :1]
    logits = model(history, mask, targets).logits  # (B, 1, L, K)
    user = model.encode(history, mask)[:, 0]  # (B, D)
    want = torch.einsum("bd,lkd->blk", user, model.heads.weight) + model.heads.bias
    torch.testing.assert_close(logits[:, 0], want, atol=1e-5, rtol=0)
    state = model.init_state(model.encode(history, mask), mask, beams=3)
    torch.testing.assert_close(state.user, user)
    with pytest.raises(ValueError, match="user vector"):
        model.decode_step(torch.zeros(2, 3, dtype=torch.long), state._replace(user=None))


def test_without_level_heads_the_node_rows_alone_score_and_the_heads_never_train() -> None:
    model = make_model(node_buckets=NODE_BUCKETS, level_heads=False).train()
    assert not model.heads.weight.requires_grad and float(model.heads.weight.abs().sum()) == 0.0
    history, mask = make_history([4, 2], n=4, seed=91)
    targets = make_targets((2,), seed=92)[:, :1]
    out = model(history, mask, targets)
    F.cross_entropy(out.logits.flatten(0, 2), targets.flatten()).backward()
    assert model.heads.weight.grad is None and model.node_table.weight.grad is not None
    torch.manual_seed(0)
    fresh = OneRecModel(dataclasses.replace(CFG, node_buckets=NODE_BUCKETS, node_init_std=0.125))
    assert 0.1 < float(fresh.node_table.weight.detach().std()) < 0.15  # node_init_std: random rows instead of zeros


@torch.no_grad()
def test_node_attributes_add_the_items_attribute_vectors_to_the_node_row_its_sid_ends_at() -> None:
    """node_logits(h, row) = h . (Node[row] + sum_a AttrOut[a]) + bias[row] for the node row that ends an item's
    SID, and h . Node[row] + bias[row] for every other row; the table starts at zero."""
    model = make_model(item_buckets=K**L, node_buckets=NODE_BUCKETS, attribute_rows=4, attributes_per_item=2,
                       node_attributes=True)
    assert float(model.attribute_out.weight.abs().sum()) == 0.0
    sids = torch.tensor([[1, 2, 3], [4, 0, 5]])
    grid = attribute_grid(sids.numpy(), [[1, 3], [2]], model.cfg)
    with pytest.raises(ValueError, match="sids"):
        model.set_item_attributes(torch.as_tensor(grid))
    model.set_item_attributes(torch.as_tensor(grid), sids)
    model.attribute_out.weight.normal_()
    model.attribute_out.weight[0].zero_()
    offset = model.node_offsets[L - 1]
    prefix = target_prefixes(sids[None], model.cfg)[0, :, -1]  # (2,)
    ends = node_rows(prefix, sids[:, -1], offset, model.cfg)  # (2,) the node rows the two SIDs end at
    other = node_rows(prefix[:1], (sids[:1, -1] + 1) % K, offset, model.cfg)  # a sibling with no item
    h = torch.randn(3, model.cfg.d_model)
    got = model.node_logits(h, torch.cat([ends, other])[:, None])[:, 0]  # (3,)
    table, extra, bias = model.node_table.weight, model.attribute_out.weight, model.node_bias
    want = torch.stack([h[0] @ (table[ends[0]] + extra[1] + extra[3]) + bias[ends[0]],
                        h[1] @ (table[ends[1]] + extra[2]) + bias[ends[1]],
                        h[2] @ table[other[0]] + bias[other[0]]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_node_weight_is_kept_at_inference_and_follows_every_change_of_what_it_reads() -> None:
    """In eval mode without grad node_weight() is computed once and reused; an in-place change of the node table,
    the attribute table or the grid, and a load_state_dict, each give the sum of the new values; training (or
    grad) never reads the kept one."""
    model = make_model(item_buckets=K**L, node_buckets=NODE_BUCKETS, attribute_rows=4, attributes_per_item=2,
                       node_attributes=True).eval()
    sids = torch.tensor([[1, 2, 3], [4, 0, 5]])
    with torch.no_grad():
        model.set_item_attributes(torch.as_tensor(attribute_grid(sids.numpy(), [[1, 3], [2]], model.cfg)), sids)
        model.attribute_out.weight.normal_()
        first = model.node_weight()
        assert model.node_weight() is first  # kept
        torch.testing.assert_close(first, model._node_weight(), rtol=0, atol=0)
        for change in (lambda: model.attribute_out.weight.add_(0.5), lambda: model.node_table.weight.mul_(2.0),
                       lambda: model.item_attribute_ids.copy_(model.item_attribute_ids.flip(0))):
            before = model.node_weight()
            change()
            after = model.node_weight()
            assert after is not before
            assert not torch.equal(after, before)
            torch.testing.assert_close(after, model._node_weight(), rtol=0, atol=0)
        other = make_model(item_buckets=K**L, node_buckets=NODE_BUCKETS, attribute_rows=4, attributes_per_item=2,
                           node_attributes=True)
        other.attribute_out.weight.normal_()
        other.set_item_attributes(torch.as_tensor(attribute_grid(sids.numpy(), [[2], [1, 3]], model.cfg)), sids)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model.node_weight(), other._node_weight(), rtol=0, atol=0)
    model.train()
    assert model.node_weight().requires_grad  # training builds it from the parameters, with grad
