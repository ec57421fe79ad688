"""The OneRec encoder-decoder: `encode`, teacher-forced `forward`, KV-cached `decode_step`, save and load."""

# Shapes: B batch/requests, W beams per request, N history positions, T decoder positions so far, m items
# per session, D d_model, H heads, hd head dim, E experts, L levels, K codes, layers = decoder layers.

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from onerec.config import ModelConfig, from_dict, save_json, to_dict
from onerec.errors import UsageError
from onerec.model.layers import (
    DecoderLayer,
    EncoderLayer,
    LevelHeads,
    group_causal_bias,
    older_only_bias,
    padding_bias,
)
from onerec.model.moe import MoEFeedForward

M = TypeVar("M", bound=nn.Module)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
INIT_STD = 0.02


class DecodeState(NamedTuple):
    """Everything `decode_step` needs besides the new tokens. All tensors, so it exports as graph I/O."""

    self_k: Tensor  # (layers, B, W, H, T, hd) self-attention key cache (T = positions decoded so far)
    self_v: Tensor  # (layers, B, W, H, T, hd)
    cross_k: Tensor  # (layers, B, H, N, hd) once per request from memory, shared by all W beams
    cross_v: Tensor  # (layers, B, H, N, hd)
    memory_mask: Tensor  # (B, N) bool, True = real history item
    # (B, W) long: each beam's current item's codes so far as one folded base-K number (`node_rows`); 0 at BOS.
    # Only a model with a node table carries it (None otherwise: nothing per step)
    prefix: Tensor | None = None
    user: Tensor | None = None  # (B, D) the most recent item's encoder state, with cfg.user_skip


class ModelOutput(NamedTuple):
    """Teacher-forced outputs."""

    logits: Tensor  # (B, m, L, K): logits[b, i, l] predicts the level-l code of item i
    aux_loss: Tensor  # scalar MoE load-balancing loss, summed over decoder layers (unweighted)


ITEM_HASH = 40503  # odd: with item_buckets a power of two >= K^L, row = flat * ITEM_HASH % buckets is a bijection
ITEM_PRIME = 2_147_483_647  # flat SIDs are folded below 2^31 first, so the product never overflows int64


def item_rows(sids: Tensor, cfg: ModelConfig) -> Tensor:
    """sids (*, L) codes -> (*,) rows of the per-item table: the SID as one number in base K, folded and mixed
    into [0, item_buckets). Integer arithmetic only, so it exports to ONNX as Mul/Add/Mod."""
    flat = sids[..., 0]
    for level in range(1, cfg.levels):
        flat = extend_prefix(flat, sids[..., level], cfg)
    return flat * ITEM_HASH % cfg.item_buckets


def attribute_grid(sids: np.ndarray, attributes: Sequence[Sequence[int]], cfg: ModelConfig) -> np.ndarray:
    """sids (N, L) and each item's attribute rows (1..attribute_rows-1) -> (item_buckets, A) long: row
    `item_rows(sid)` lists its item's attributes, padded with 0 (and rows no item maps to hold only 0)."""
    rows = item_rows(torch.as_tensor(np.asarray(sids), dtype=torch.long), cfg).numpy()  # (N,)
    grid = np.zeros((cfg.item_buckets, cfg.attributes_per_item), dtype=np.int64)
    for row, values in zip(rows, attributes, strict=True):
        kept = list(values)[:cfg.attributes_per_item]
        grid[row, :len(kept)] = kept
    return grid


def causal_bias(padding: Tensor, older: Tensor, real_query: Tensor) -> Tensor:
    """padding (B, 1, 1, N) + older-only (1, 1, Q, N) for the real queries (B, 1, Q, 1) bool only -> (B, 1, Q, N).

    A padded query keeps the padding bias alone: with the causal part too every key of it would be masked, and in
    fp16 q.k + min overflows to -inf, so its softmax would be NaN (and NaN times a zero weight still reaches the
    real positions that read it). Clamped at the dtype's min, so two masks never sum to -inf."""
    return (padding + older * real_query.to(older.dtype)).clamp(min=torch.finfo(older.dtype).min)


def node_offsets(cfg: ModelConfig) -> Tensor:
    """(L,) long: offset of level l's paths, K + K^2 + .. + K^l (folded), so paths of different lengths differ."""
    offsets, total = [], 0
    for level in range(cfg.levels):
        offsets.append(total % ITEM_PRIME)
        total += cfg.codes ** (level + 1)
    return torch.tensor(offsets)


def extend_prefix(prefix: Tensor, codes: Tensor, cfg: ModelConfig) -> Tensor:
    """prefix (*) folded base-K number of codes c_0..c_{l-1}, codes (*) c_l -> the number of c_0..c_l (the fold
    `item_rows` uses too, so at the last level it is the item's flat SID)."""
    return (prefix * cfg.codes + codes) % ITEM_PRIME


def node_rows(prefix: Tensor, codes: Tensor, offset: Tensor, cfg: ModelConfig) -> Tensor:
    """Rows of the per-trie-node output table for child `codes` of `prefix` (broadcast together); `offset` is
    `node_offsets(cfg)` at the children's level. Integer arithmetic only (ONNX Mul/Add/Mod), as `item_rows`."""
    key = (extend_prefix(prefix, codes, cfg) + offset) % ITEM_PRIME
    return key * ITEM_HASH % cfg.node_buckets


def target_prefixes(targets: Tensor, cfg: ModelConfig) -> Tensor:
    """targets (B, m, L) -> (B, m, L): entry l is the folded number of the item's codes before level l (0 at 0)."""
    prefixes = [torch.zeros_like(targets[..., 0])]
    for level in range(1, cfg.levels):
        prefixes.append(extend_prefix(prefixes[-1], targets[..., level - 1], cfg))
    return torch.stack(prefixes, dim=-1)


class OneRecModel(nn.Module):
    """Encoder over the history items, MoE decoder over the session tokens, one output head per level.

    Encoder input: history (B, N, L) semantic IDs, most recent first, padded at the end; mask (B, N) bool,
    True = real item. Every row needs at least one real item (an all-padded row attends to padding only and
    its outputs are meaningless). Padded entries may hold any value: they are zeroed before the lookup.
    An item's embedding is sum_l Emb_l[code_l] + PosEmb[n] (n = 0 for the most recent item); the L
    per-level tables are stored as one (L*K, D) table with level offsets l*K. With cfg.item_buckets > 0 an
    item's own row of a (item_buckets, D) table is added (`item_rows`): the SIDs still carry what items share,
    the row what is particular to one item; rows start at zero, so a SID never seen in training adds nothing.

    With cfg.node_buckets > 0 every level's logits also get a per-trie-node term, h . Node[row] + bias[row] for
    child c of the item's prefix (`node_rows`): what the shared heads cannot say about one prefix or one item.
    The decode step then carries each beam's prefix in `DecodeState.prefix`.

    Decoder sequence per session (paper eq. 3): [BOS, s1^1..s1^L, BOS, s2^1, .., sm^L], T = m*(L+1).
    The input at position p is BOS when p % (L+1) == 0, else the level (p % (L+1)) - 1 code of item
    p // (L+1). Decoder input tokens use their own table, separate from the encoder's: (L*K + 1, D), row
    l*K + c = code c at level l, row L*K = the learned BOS vector; plus a learned position embedding over T.
    The output at p with l = p % (L+1) < L predicts the level-l code of item p // (L+1) with head l; at
    l == L the next token is the deterministic BOS (no loss) and `decode_step` returns head L-1's
    logits there, which are meaningless.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, K, D = cfg.levels, cfg.codes, cfg.d_model
        self.bos_id = L * K
        self.item_emb = nn.Embedding(L * K, D)
        self.item_table = nn.Embedding(cfg.item_buckets, D) if cfg.item_buckets > 0 else None
        self.attribute_table = None
        if cfg.attribute_rows > 0:
            if cfg.item_buckets <= 0 or cfg.attributes_per_item <= 0:
                raise ValueError("attribute_rows needs item_buckets > 0 and attributes_per_item > 0")
            self.attribute_table = nn.Embedding(cfg.attribute_rows, D, padding_idx=0)
            # (item_buckets, A): the attribute rows of the item at each per-item row, 0 = none (set_item_attributes)
            self.register_buffer("item_attribute_ids", torch.zeros(cfg.item_buckets, cfg.attributes_per_item,
                                                                   dtype=torch.long))
        self.enc_pos = nn.Embedding(cfg.history_len, D)
        self.encoder = nn.ModuleList(
            EncoderLayer(D, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.encoder_layers)
        )
        self.enc_norm = nn.LayerNorm(D)
        self.token_emb = nn.Embedding(L * K + 1, D)
        self.dec_pos = nn.Embedding(cfg.decoder_len, D)
        self.decoder = nn.ModuleList(
            DecoderLayer(D, cfg.n_heads, MoEFeedForward(D, cfg.d_ff, cfg.n_experts, cfg.top_k), cfg.dropout,
                         cfg.attn_dropout)
            for _ in range(cfg.decoder_layers)
        )
        self.dec_norm = nn.LayerNorm(D)
        self.heads = LevelHeads(L, D, K)
        self.node_table = nn.Embedding(cfg.node_buckets, D) if cfg.node_buckets > 0 else None
        self.node_bias = nn.Parameter(torch.zeros(cfg.node_buckets)) if cfg.node_buckets > 0 else None
        self.register_buffer("node_offsets", node_offsets(cfg), persistent=False)  # (L,)
        # user_skip: state = user vector + gate * decoder state, the gate from 0 (ReZero): the model starts as a
        # hierarchical softmax of the user vector and lets the prefix-conditioned decoder in as far as it helps
        self.decoder_gate = nn.Parameter(torch.zeros(())) if cfg.user_skip else None
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("level_offsets", torch.arange(L) * K, persistent=False)  # (L,)
        self.reset_parameters()
        self.attribute_out = None  # built after the others' initialisation: their weights stay what they were
        if cfg.node_attributes and self.attribute_table is not None and self.node_table is not None:
            self.attribute_out = nn.Embedding(cfg.attribute_rows, D, padding_idx=0)
            nn.init.zeros_(self.attribute_out.weight)
            # (node_buckets,) the per-item row of the item whose SID ends at each node row; item_buckets = none
            self.register_buffer("node_item_rows", torch.full((cfg.node_buckets,), cfg.item_buckets,
                                                              dtype=torch.long))

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) for embeddings, linears and heads; zero biases; LayerNorms at identity.

        Uses torch's global RNG: `torch.manual_seed(s)` before construction makes the weights reproducible.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LevelHeads):
                nn.init.normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
        if self.item_table is not None:  # zero: an item never trained on adds nothing
            nn.init.zeros_(self.item_table.weight)
        if self.attribute_table is not None:
            with torch.no_grad():
                self.attribute_table.weight[0].zero_()  # the padding row: no attribute adds nothing
        if self.node_table is not None:
            nn.init.normal_(self.node_table.weight, std=self.cfg.node_init_std)  # std 0: zeros
        if getattr(self, "attribute_out", None) is not None:  # zero: the node rows start as without attributes
            nn.init.zeros_(self.attribute_out.weight)
        if not self.cfg.level_heads:  # fixed at zero: the node rows alone score the codes
            nn.init.zeros_(self.heads.weight)
            nn.init.zeros_(self.heads.bias)
            self.heads.requires_grad_(False)

    # ---- encoder -------------------------------------------------------------------------------------

    def encode(self, history: Tensor, mask: Tensor) -> Tensor:
        """history (B, N, L) long, mask (B, N) bool -> memory (B, N, D)."""
        sids = torch.where(mask.unsqueeze(-1), history, 0)  # (B, N, L) padding -> code 0
        positions = torch.arange(history.shape[1], device=history.device)  # (N,)
        x = self.item_emb(sids + self.level_offsets).sum(dim=-2) + self.enc_pos(positions)  # (B, N, D)
        if self.item_table is not None:
            rows = item_rows(sids, self.cfg)  # (B, N)
            x = x + self.item_table(rows)
            if self.attribute_table is not None:  # (B, N, A) attribute rows -> summed (B, N, D)
                x = x + self.attribute_table(self.item_attribute_ids[rows]).sum(dim=-2)
        x = self.drop(x)
        bias = padding_bias(mask, x.dtype)  # (B, 1, 1, N)
        if self.cfg.causal_encoder:  # (B, 1, N, N): item n reads itself and older items only
            bias = causal_bias(bias, older_only_bias(history.shape[1], x.dtype, x.device), mask[:, None, :, None])
        for layer in self.encoder:
            x = layer(x, bias)
        return self.enc_norm(x)

    def set_item_attributes(self, grid: Tensor, sids: Tensor | None = None) -> None:
        """grid (item_buckets, A) long: the attribute-table rows of the item at each per-item row (`attribute_grid`).
        With cfg.node_attributes also the catalogue's sids (N, L): each one's last-level node row reads its item's
        attributes on the output side."""
        if self.attribute_table is None:
            raise ValueError("set_item_attributes needs a model with cfg.attribute_rows > 0")
        if tuple(grid.shape) != tuple(self.item_attribute_ids.shape):
            raise ValueError(f"attribute grid must be {tuple(self.item_attribute_ids.shape)}, got {tuple(grid.shape)}")
        if int(grid.min()) < 0 or int(grid.max()) >= self.cfg.attribute_rows:
            raise ValueError(f"attribute grid rows must lie in [0, {self.cfg.attribute_rows})")
        self.item_attribute_ids.copy_(grid)
        if self.attribute_out is not None:
            if sids is None:
                raise ValueError("a model with cfg.node_attributes needs the catalogue's sids (N, L)")
            sids = sids.to(self.node_item_rows.device).long()[None]  # (1, N, L)
            last = node_rows(target_prefixes(sids, self.cfg)[..., -1], sids[..., -1], self.node_offsets[-1],
                             self.cfg)[0]  # (N,) the node row that ends each SID
            self.node_item_rows.fill_(self.cfg.item_buckets)
            self.node_item_rows[last] = item_rows(sids, self.cfg)[0]

    # ---- teacher forcing -----------------------------------------------------------------------------

    def decoder_inputs(self, targets: Tensor) -> Tensor:
        """targets (B, m, L) codes -> decoder input token ids (B, T=m*(L+1)): [BOS, s^1..s^L] per item."""
        ids = targets + self.level_offsets  # (B, m, L)
        bos = torch.full_like(ids[..., :1], self.bos_id)  # (B, m, 1)
        return torch.cat([bos, ids], dim=-1).flatten(1)  # (B, T)

    def forward(self, history: Tensor, mask: Tensor, targets: Tensor) -> ModelOutput:
        """Full causal pass: history (B, N, L), mask (B, N), targets (B, m, L) with m <= session_len."""
        self._check_targets(targets)
        B, m, L = targets.shape
        memory = self.encode(history, mask)  # (B, N, D)
        tokens = self.decoder_inputs(targets)  # (B, T)
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        x = self.drop(self.token_emb(tokens) + self.dec_pos(positions))  # (B, T, D)
        x, aux = self.teacher_decode(x, memory, padding_bias(mask, x.dtype))
        h = self.dec_norm(x).unflatten(1, (m, L + 1))[:, :, :L]  # (B, m, L, D): the predicting positions
        h = self.with_user(h, memory[:, :1, None, :])  # the user vector: the most recent item's state
        return ModelOutput(self.output_logits(h, targets), aux)

    def teacher_decode(self, x: Tensor, memory: Tensor, cross_bias: Tensor,
                       self_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The decoder layers over teacher-forced inputs x (B, T, D) reading memory (B, N, D) -> x, summed MoE aux."""
        aux = x.new_zeros(())
        for layer in self.decoder:
            mem_k, mem_v = layer.cross_attn.project_kv(memory)  # (B, H, N, hd)
            x, layer_aux = layer(x, mem_k, mem_v, cross_bias, self_bias)
            aux = aux + layer_aux
        return x, aux

    def with_user(self, h: Tensor, user: Tensor | None) -> Tensor:
        """cfg.user_skip: the user vector (broadcast to h) plus the gated decoder state h; else h unchanged."""
        if self.decoder_gate is None:
            return h
        if user is None:
            raise ValueError("a user_skip model decodes with the user vector (DecodeState.user)")
        return user + self.decoder_gate * h

    def forward_positions(self, history: Tensor, mask: Tensor, targets: Tensor) -> ModelOutput:
        """Every position at once (`TrainConfig.all_positions`, needs cfg.causal_encoder): history (B, N, L),
        mask (B, N), targets (B, N, L) the item that followed each history item (targets[:, 0] the one after the
        most recent). Target n's decoder block [BOS, codes] reads only encoder states n.. (that item and older).
        Returns logits (B, N, L, K); target 0's equal `forward(history, mask, targets[:, :1])`'s."""
        if not self.cfg.causal_encoder:
            raise ValueError("forward_positions needs ModelConfig.causal_encoder (a state must not see later items)")
        B, N, L = targets.shape
        memory = self.encode(history, mask)  # (B, N, D)
        tokens = self.decoder_inputs(targets)  # (B, N*(L+1))
        positions = torch.arange(tokens.shape[1], device=tokens.device) % (L + 1)  # each block from 0
        x = self.drop(self.token_emb(tokens) + self.dec_pos(positions))  # (B, N*(L+1), D)
        self_bias = group_causal_bias(N, L + 1, x.dtype, x.device)  # (1, 1, N*(L+1), N*(L+1))
        older = older_only_bias(N, x.dtype, x.device).repeat_interleave(L + 1, dim=2)  # (1, 1, N*(L+1), N)
        real = mask.repeat_interleave(L + 1, dim=1)[:, None, :, None]  # (B, 1, N*(L+1), 1) a real target's block
        cross_bias = causal_bias(padding_bias(mask, x.dtype), older, real)  # (B, 1, N*(L+1), N)
        x, aux = self.teacher_decode(x, memory, cross_bias, self_bias)
        h = self.dec_norm(x).unflatten(1, (N, L + 1))[:, :, :L]  # (B, N, L, D)
        h = self.with_user(h, memory[:, :, None, :])  # target n's user vector: the state of item n
        return ModelOutput(self.output_logits(h, targets), aux)

    def output_logits(self, h: Tensor, targets: Tensor) -> Tensor:
        """h (B, m, L, D) the predicting states of targets (B, m, L) -> logits (B, m, L, K): the level heads, plus
        the node rows of every child of each target prefix with a node table."""
        logits = self.heads(h)  # (B, m, L, K)
        if self.node_table is not None:
            codes = torch.arange(self.cfg.codes, device=targets.device)  # (K,) every child of each prefix
            prefix = target_prefixes(targets, self.cfg)[..., None]  # (B, m, L, 1)
            rows = node_rows(prefix, codes, self.node_offsets[:, None], self.cfg)  # (B, m, L, K)
            logits = logits + self.node_logits(h, rows)
        return logits

    def node_logits(self, h: Tensor, rows: Tensor) -> Tensor:
        """h (*, D), rows (*, C) of the node table -> (*, C): h . Node[row] + bias[row]."""
        assert self.node_table is not None and self.node_bias is not None
        vectors = F.embedding(rows, self.node_weight())  # (*, C, D)
        return torch.matmul(vectors, h.unsqueeze(-1)).squeeze(-1) + self.node_bias[rows]

    def node_weight(self) -> Tensor:
        """(node_buckets, D): the node table, plus with cfg.node_attributes sum_a AttrOut[a] of the item each node
        row ends (0 for rows that end none). At inference (eval mode, no grad, not exporting) the sum is kept and
        reused until one of the tensors it reads changes (in place or replaced): decoding pays for it once."""
        assert self.node_table is not None
        if self.attribute_out is None:
            return self.node_table.weight
        if (self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling()):
            return self._node_weight()
        sources = (self.node_table.weight, self.attribute_out.weight, self.item_attribute_ids, self.node_item_rows)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        cached = self.__dict__.get("_node_weight_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._node_weight())
            self.__dict__["_node_weight_cache"] = cached  # a plain attribute: not in state_dict, not moved by .to()
        return cached[1]

    def _node_weight(self) -> Tensor:
        assert self.node_table is not None and self.attribute_out is not None
        per_item = self.attribute_out(self.item_attribute_ids).sum(dim=-2)  # (item_buckets, D)
        per_item = torch.cat([per_item, per_item.new_zeros(1, per_item.shape[1])])  # row item_buckets: none
        return self.node_table.weight + per_item[self.node_item_rows]  # (node_buckets, D)

    def _check_targets(self, targets: Tensor) -> None:
        if targets.dim() != 3 or targets.shape[-1] != self.cfg.levels:
            raise ValueError(f"targets must be (B, m, L={self.cfg.levels}), got {tuple(targets.shape)}")
        if not 1 <= targets.shape[1] <= self.cfg.session_len:
            raise ValueError(f"targets hold {targets.shape[1]} items; 1..{self.cfg.session_len} allowed")

    # ---- KV-cached decoding --------------------------------------------------------------------------

    def init_state(self, memory: Tensor, mask: Tensor, beams: int) -> DecodeState:
        """memory (B, N, D), mask (B, N) -> state with an empty self cache (T=0) for `beams` beams and the
        cross-attention K/V of every layer, computed once per request (no beam dimension)."""
        B = memory.shape[0]
        kv = [layer.cross_attn.project_kv(memory) for layer in self.decoder]  # layers x (B, H, N, hd)
        shape = (len(self.decoder), B, beams, self.cfg.n_heads, 0, self.cfg.head_dim)
        return DecodeState(
            self_k=memory.new_zeros(shape),
            self_v=memory.new_zeros(shape),
            cross_k=torch.stack([k for k, _ in kv]),
            cross_v=torch.stack([v for _, v in kv]),
            memory_mask=mask,
            prefix=torch.zeros((B, beams), dtype=torch.long, device=memory.device) if self.node_table is not None
            else None,
            user=memory[:, 0] if self.cfg.user_skip else None,
        )

    def step_token_ids(self, tokens: Tensor, position: Tensor) -> Tensor:
        """tokens (B, W) codes at decoder position `position` (1,) -> token table rows (B, W).

        BOS positions ignore `tokens` (any value is fine there); elsewhere the code is offset by its level.
        """
        level_in = position % (self.cfg.levels + 1)  # (1,) 0 = BOS, l+1 = level-l code
        ids = (level_in - 1) * self.cfg.codes + tokens  # (B, W)
        return torch.where(level_in == 0, torch.full_like(tokens, self.bos_id), ids)

    def decode_step(
        self, tokens: Tensor, state: DecodeState, beam_idx: Tensor | None = None, candidates: Tensor | None = None
    ) -> tuple[Tensor, DecodeState]:
        """Decode position p = T (the self cache length) for every beam.

        tokens (B, W) long: the input at position p (ignored at BOS positions). beam_idx (B, W) long or None:
        new beam w continues parent beam beam_idx[b, w] (parents index the cache's beams, so W may also
        grow, e.g. 1 -> W after the first step); the self cache is gathered by it before appending. Returns
        logits (B, W, K) predicting position p+1 (head p % (L+1); meaningless when that is L) and the state
        with T+1. With candidates (Bc, G, C) long (see `LevelHeads.select_candidates`) the logits are
        (B, W, C), of those codes only: the head's cost then follows the trie's fan-out, not K.
        A wrapper over `decode_layers` for the stacked `DecodeState`.
        """
        logits, present, prefix = self.decode_layers(
            tokens, state.self_k.unbind(0), state.self_v.unbind(0), state.cross_k.unbind(0),
            state.cross_v.unbind(0), state.memory_mask, beam_idx, candidates, state.prefix, state.user,
        )
        new_state = DecodeState(
            torch.stack([k for k, _ in present]), torch.stack([v for _, v in present]),
            state.cross_k, state.cross_v, state.memory_mask, prefix, state.user,
        )
        return logits, new_state

    def decode_layers(
        self,
        tokens: Tensor,
        self_k: Sequence[Tensor],
        self_v: Sequence[Tensor],
        cross_k: Sequence[Tensor],
        cross_v: Sequence[Tensor],
        memory_mask: Tensor,
        beam_idx: Tensor | None = None,
        candidates: Tensor | None = None,
        prefix: Tensor | None = None,
        user: Tensor | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor | None]:
        """`decode_step` on per-layer caches: self_k/self_v layers x (B, W0, H, T, hd), cross_k/cross_v
        layers x (B, H, N, hd), prefix (B, W0) long or None. Returns the logits, layers x (k, v)
        (B, W, H, T+1, hd) and the beams' new prefixes (B, W) (None when none came in; a model with a node
        table needs them). `user` (B, D): the user vector a cfg.user_skip model adds to every level's state.
        This is exactly the exported decoder graph: per-layer tensors in and out, so no
        step copies a stacked cache.

        No Python branching on data: the position comes from the cache's shape and the head and input-token
        table rows are picked by tensor ops, so one traced graph serves every position.
        """
        T = self_k[0].shape[-2]
        position = torch.arange(T, T + 1, device=tokens.device)  # (1,)
        x = self.token_emb(self.step_token_ids(tokens, position)) + self.dec_pos(position)  # (B, W, D)
        x = self.drop(x)
        bias = padding_bias(memory_mask, x.dtype)  # (B, 1, 1, N)
        present = []
        for i, layer in enumerate(self.decoder):
            k_cache, v_cache = self_k[i], self_v[i]
            if beam_idx is not None:
                k_cache, v_cache = reorder_beams(k_cache, beam_idx), reorder_beams(v_cache, beam_idx)
            x, k, v = layer.step(x, k_cache, v_cache, cross_k[i], cross_v[i], bias)
            present.append((k, v))  # (B, W, H, T+1, hd)
        if prefix is not None:
            prefix = self.step_prefix(prefix, tokens, position, beam_idx)  # (B, W)
        head = (position % (self.cfg.levels + 1)).clamp(max=self.cfg.levels - 1)  # (1,)
        h = self.with_user(self.dec_norm(x), None if user is None else user[:, None, :])  # (B, W, D)
        if candidates is None:
            logits = self.heads.select(h, head)  # (B, W, K)
            codes = torch.arange(self.cfg.codes, device=tokens.device)  # (K,)
        else:
            logits = self.heads.select_candidates(h, head, candidates)  # (B, W, C)
            codes = candidates  # (Bc, G, C), broadcast against the beams' prefixes
        if self.node_table is not None:
            if prefix is None:
                raise ValueError("a model with a node table decodes with the beams' prefixes (DecodeState.prefix)")
            rows = node_rows(prefix.unsqueeze(-1), codes, self.node_offsets.index_select(0, head), self.cfg)
            logits = logits + self.node_logits(h, rows.expand(logits.shape))  # (B, W, C)
        return logits, present, prefix

    def step_prefix(self, prefix: Tensor, tokens: Tensor, position: Tensor, beam_idx: Tensor | None) -> Tensor:
        """prefix (B, W0) of the parents, tokens (B, W) input at `position` -> (B, W) the prefix its output
        extends: 0 at a BOS position, else the parent's prefix followed by the input code."""
        if beam_idx is not None:
            prefix = prefix.gather(1, beam_idx)  # (B, W)
        extended = extend_prefix(prefix.expand_as(tokens), tokens, self.cfg)
        return torch.where(position % (self.cfg.levels + 1) == 0, torch.zeros_like(tokens), extended)


def reorder_beams(cache: Tensor, beam_idx: Tensor) -> Tensor:
    """One layer's cache (B, W, H, T, hd), beam_idx (B, W') parents in [0, W) -> (B, W', H, T, hd).

    Reshapes use explicit sizes, never -1: the first step's cache is empty (T = 0), and ONNX cannot infer a
    -1 dimension of an empty tensor.
    """
    B, W, H, T, hd = cache.shape
    W_new = beam_idx.shape[1]
    offsets = torch.arange(B, device=beam_idx.device).unsqueeze(1) * W  # (B, 1)
    flat = (beam_idx + offsets).reshape(B * W_new)  # rows of the (B*W) flattened beams
    return cache.reshape(B * W, H, T, hd).index_select(0, flat).reshape(B, W_new, H, T, hd)


def count_parameters(model: OneRecModel) -> dict[str, int]:
    """Parameter counts for logs: `total`, and `active_per_token` = total minus the (E - top_k) experts a
    decoder token does not run, per MoE layer (embedding tables count in full)."""
    total = sum(p.numel() for p in model.parameters())
    moes = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    inactive = sum((m.n_experts - m.top_k) * m.expert_parameters() for m in moes)
    return {"total": total, "active_per_token": total - inactive}


# ---- persistence -------------------------------------------------------------------------------------


def save_model(model: OneRecModel, directory: str | Path) -> Path:
    """Write `model.safetensors` (weights) and `model.json` (the ModelConfig) into `directory`."""
    directory = save_weights(model, model.cfg, directory)
    logger.info("saved model (%d parameters) to %s", count_parameters(model)["total"], directory)
    return directory


def save_weights(model: nn.Module, cfg: object, directory: str | Path) -> Path:
    """`directory/model.safetensors` (written to a temp name, then renamed) and `directory/model.json` (`cfg`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_FILE)
    save_json(directory / CONFIG_FILE, to_dict(cfg))
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> OneRecModel:
    """Rebuild a model written by `save_model`, in eval mode on `device`.

    Raises UsageError naming the file when it is missing, unreadable, or does not match the config.
    """
    directory = Path(directory)
    model = OneRecModel(_read_config(directory / CONFIG_FILE))
    return load_weights(model, directory / WEIGHTS_FILE, "model").to(device).eval()


def load_weights(model: M, weights_path: Path, what: str) -> M:
    """`model` with the safetensors weights at `weights_path` (strict); UsageError naming the file otherwise."""
    if not weights_path.is_file():
        raise UsageError(f"{weights_path}: {what} weights not found")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{weights_path}: not a readable safetensors file ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{weights_path}: weights do not match {weights_path.parent / CONFIG_FILE} ({e})") from e
    return model


def _read_config(path: Path) -> ModelConfig:
    """model.json -> ModelConfig, or UsageError naming the file."""
    if not path.is_file():
        raise UsageError(f"{path}: model config not found")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return from_dict(ModelConfig, data)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a valid model config ({e})") from e
