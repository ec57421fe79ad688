"""Batched session generation: encode each history once, then trie-constrained beam search over `decode_step`.

Legend: B requests, N history positions, L levels, W beams, K codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from onerec.config import BeamConfig
from onerec.data.sid import pad_histories
from onerec.decoding.beam import BeamResult, beam_search
from onerec.model.onerec import DecodeState, OneRecModel
from onerec.tokenizer.trie import PrefixTrie


class ModelStep:
    """The beam search's step function over `OneRecModel.decode_step`; owns the decode state."""

    def __init__(self, model: OneRecModel, state: DecodeState) -> None:
        self.model = model
        self.state = state

    def __call__(self, tokens: torch.Tensor, beam_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model.decode_step(tokens, self.state, beam_idx, candidates)  # (B, W, C)
        return logits


@torch.inference_mode()
def generate(
    model: OneRecModel,
    trie: PrefixTrie,
    histories: Sequence[np.ndarray],
    beam: BeamConfig,
    exclude: Sequence[np.ndarray] | None = None,
    device: str | torch.device = "cpu",
    session_len: int | None = None,
) -> BeamResult:
    """Best `beam.num_sessions` sessions per history; `exclude[b]` are leaf ids banned for request b. Sessions
    hold the model's m items, or the first `session_len` of them (1: a ranked list of next items). Whole sessions
    unless `session_len` is given: `beam.session_len` is the serving setting, which callers pass on purpose."""
    if session_len is not None and not 1 <= session_len <= model.cfg.session_len:
        raise ValueError(f"session_len {session_len} is outside [1, {model.cfg.session_len}] (the model's m)")
    history, mask = pad_histories(histories, model.cfg.history_len)
    history, mask = history.to(device), mask.to(device)
    memory = model.encode(history, mask)  # (B, N, D)
    state = model.init_state(memory, mask, beam.beam_width)  # cross K/V once per request
    return beam_search(
        ModelStep(model, state),
        trie,
        batch=len(histories),
        session_len=session_len or model.cfg.session_len,
        beam_width=beam.beam_width,
        num_sessions=beam.num_sessions,
        exclude=exclude if beam.exclude_history else None,
        device=device,
    )
