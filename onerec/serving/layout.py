"""The files of one exported model version (`model_repo/onerec/<n>/`) and the ONNX graphs' tensor names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onerec.errors import UsageError

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"
PRECISIONS = ("fp32", "fp16")

# encoder.onnx: history -> the cross-attention K/V of every decoder layer, once per request.
HISTORY = "history_sids"  # (B, N, L) int64, most recent first, padded at the end
HISTORY_MASK = "history_mask"  # (B, N) bool, True = real item
# decoder.onnx: one decode step for W beams against the self-attention cache (optimum-style names).
INPUT_IDS = "input_ids"  # (B, W) int64 decoder input codes at position T (ignored at BOS positions)
BEAM_IDX = "beam_idx"  # (B, W) int64 parent beam of each beam: the cache is gathered by it in the graph
CANDIDATES = "candidates"  # (Bc, G, C) int64 codes to score, Bc in {1, B}, G in {1, W}
ENCODER_MASK = "encoder_attention_mask"  # (B, N) bool
LOGITS = "logits"  # (B, W, C) float32


def past_name(layer: int, side: str, kind: str) -> str:
    """Cache input name, e.g. past_key_values.0.decoder.key (side: decoder | encoder, kind: key | value)."""
    return f"past_key_values.{layer}.{side}.{kind}"


def present_name(layer: int, side: str, kind: str) -> str:
    """Cache output name, e.g. present.0.decoder.key; encoder.onnx outputs present.<i>.encoder.*."""
    return f"present.{layer}.{side}.{kind}"


@dataclass(frozen=True)
class Manifest:
    """What a version directory holds: which model, in which precision, over which catalog."""

    preset: str
    precision: str  # fp32 | fp16
    catalog_hash: str
    source_checkpoint: str
    model_version: int
    model: dict[str, Any]  # the ModelConfig as a dict
    created: str

    def save(self, directory: Path) -> None:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """Read `manifest.json`, or UsageError naming it."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise UsageError(f"{path}: manifest not found (not an exported model version)")
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{path}: not a valid manifest ({e})") from e

# The Triton model's tensors (DESIGN.md §4); named here so the engine's errors name them.
IN_HISTORY = "HISTORY_SIDS"  # INT32 [-1, L]
IN_BEAM_WIDTH = "BEAM_WIDTH"  # INT32 [1], optional
IN_NUM_SESSIONS = "NUM_SESSIONS"  # INT32 [1], optional
IN_EXCLUDE = "EXCLUDE_HISTORY"  # BOOL [1], optional
OUT_SESSIONS = "SESSION_SIDS"  # INT32 [R, m, L]
OUT_SCORES = "SESSION_SCORES"  # FP32 [R]
MAX_BEAM_WIDTH = 1024
