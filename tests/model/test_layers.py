"""Building blocks: padding bias, per-level heads, cached self-attention step, the decode-step attention."""

# Shapes: B batch, W beams, N keys, S sequence, D d_model, H heads, hd head dim, L levels, K codes.

import torch

from onerec.model.layers import CrossAttention, LevelHeads, SelfAttention, attend, attend_step, padding_bias


def test_padding_bias_is_zero_on_real_keys_and_most_negative_on_padding() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])  # (B, N)
    bias = padding_bias(mask, torch.float32)
    assert bias.shape == (2, 1, 1, 3)
    assert torch.equal(bias[:, 0, 0] == 0, mask)
    assert torch.all(bias[:, 0, 0][~mask] == torch.finfo(torch.float32).min)


def test_level_heads_select_matches_the_stacked_heads() -> None:
    torch.manual_seed(0)
    heads = LevelHeads(levels=3, d_model=8, codes=5)
    h = torch.randn(2, 4, 3, 8)  # (B, m, L, D)
    full = heads(h)  # (B, m, L, K)
    assert full.shape == (2, 4, 3, 5)
    for level in range(3):
        picked = heads.select(h[:, :, level], torch.tensor([level]))  # (B, m, K)
        torch.testing.assert_close(picked, full[:, :, level], atol=1e-6, rtol=0)


def test_self_attention_step_with_cache_equals_causal_forward() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(d_model=8, n_heads=2, dropout=0.0).eval()
    x = torch.randn(3, 6, 8)  # (B*W, S, D) with W = 1
    full = attn(x, causal=True)
    k = v = torch.zeros(3, 1, 2, 0, 4)  # (B, W, H, T=0, hd)
    for s in range(6):
        out, k, v = attn.step(x[:, s : s + 1], k, v)  # x (B, W=1, D)
        torch.testing.assert_close(out[:, 0], full[:, s], atol=1e-6, rtol=0)
    assert k.shape == (3, 1, 2, 6, 4)


def test_attend_step_equals_sdpa_with_a_padding_bias() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)  # (B, H, Q|N, hd)
    bias = padding_bias(torch.tensor([[True] * 7, [True] * 3 + [False] * 4]), torch.float32)  # (B, 1, 1, N)
    expected = attend(q, k, v, bias, dropout=0.0)
    torch.testing.assert_close(attend_step(q, k, v, 4**-0.5, bias), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(attend_step(q, k, v, 4**-0.5), attend(q, k, v, None, 0.0), atol=1e-6, rtol=0)
    # a padded key gets exactly zero weight: changing its value changes nothing
    v2 = v.clone()
    v2[1, :, 5] = 1e6
    torch.testing.assert_close(attend_step(q, k, v2, 4**-0.5, bias)[1], expected[1], atol=1e-6, rtol=0)


def test_cross_attention_step_equals_forward() -> None:
    torch.manual_seed(0)
    cross = CrossAttention(d_model=8, n_heads=2, dropout=0.0).eval()
    memory, x = torch.randn(2, 6, 8), torch.randn(2, 5, 8)  # (B, N, D), (B, W, D)
    k, v = cross.project_kv(memory)  # (B, H, N, hd)
    bias = padding_bias(torch.tensor([[True] * 6, [True] * 2 + [False] * 4]), torch.float32)
    torch.testing.assert_close(cross.step(x, k, v, bias), cross(x, k, v, bias), atol=1e-6, rtol=0)
