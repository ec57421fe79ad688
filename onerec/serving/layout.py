"""The one owner of the model repository's layout and the Triton contract: names, defaults, version discovery.

A repository is `REPO/onerec/` holding `config.pbtxt` (rendered by export) and numbered version directories
`1/, 2/, ...`, each with the ONNX graphs, the catalog, `manifest.json` and the backend adapter `model.py`. Export,
the engine, the backend adapter, the gateway and the local stack all read the layout through this module."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onerec.errors import UsageError

MODEL_NAME = "onerec"  # the Triton model
CONFIG_FILE = "config.pbtxt"  # REPO/onerec/config.pbtxt, rendered from the committed template by export
BACKEND_FILE = "model.py"  # the Python-backend adapter, copied into every version
MANIFEST_FILE = "manifest.json"
ROLLOUT_FILE = "rollout.json"  # REPO/onerec/rollout.json: which versions are loaded, primary, canary (export/rollout)
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
WEIGHT_FILES = (ENCODER_FILE, DECODER_FILE)  # what versions exported from the same weights share (hard links)
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
# only with ModelConfig.node_buckets > 0: each beam's codes so far as one folded number (onerec.model.onerec)
PAST_PREFIX = "past_prefix"  # (B, W0) int64
PRESENT_PREFIX = "present_prefix"  # (B, W) int64
# only with ModelConfig.user_skip: the most recent item's encoder state, an encoder output and a decoder input
USER_STATE = "user_state"  # (B, D)


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
    session_len: int = 0  # items per served session (SESSION_SIDS' m); 0 = the model's m (older manifests)
    weights_hash: str = ""  # sha256 of the checkpoint's weights + precision: equal -> the ONNX files are shared

    @property
    def served_session_len(self) -> int:
        """m of SESSION_SIDS [R, m, L]: the items the backend generates per session."""
        return int(self.session_len or self.model["session_len"])

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
IN_BANNED = "BANNED_SIDS"  # INT32 [-1, L], optional: SIDs never generated (rows holding a -1 are padding)
OUT_SESSIONS = "SESSION_SIDS"  # INT32 [R, m, L]
OUT_SCORES = "SESSION_SCORES"  # FP32 [R]
DEFAULT_BEAM_WIDTH = 128  # BEAM_WIDTH when the request leaves it out
DEFAULT_NUM_SESSIONS = 16  # NUM_SESSIONS when the request leaves it out
MAX_BEAM_WIDTH = 1024
# The model config's `parameters` the gateway routes by (DESIGN.md §4): the primary version and its catalog hash
# (`model_version`, `catalog_hash`), every loaded version's hash, and the canary and its share of users.
PARAM_VERSION = "model_version"
PARAM_CATALOG_HASH = "catalog_hash"
PARAM_CANARY_VERSION = "canary_version"  # "" = no canary
PARAM_CANARY_SHARE = "canary_share"  # fraction of users in [0, 1], as text


def catalog_hash_param(version: int | str) -> str:
    """The parameter holding one loaded version's catalog hash (`catalog_hash_3`)."""
    return f"{PARAM_CATALOG_HASH}_{version}"


def model_dir(repo: Path, model: str = MODEL_NAME) -> Path:
    """REPO/onerec: the Triton model directory (config.pbtxt and the versions)."""
    return Path(repo) / model


def version_dirs(model_directory: Path) -> list[Path]:
    """Exported version directories (numeric, with a manifest) of a model directory, highest version first."""
    if not model_directory.is_dir():
        return []
    dirs = [d for d in model_directory.iterdir()
            if d.is_dir() and d.name.isdigit() and (d / MANIFEST_FILE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name), reverse=True)


def latest_version(repo: Path) -> Path | None:
    """The newest exported version of REPO/onerec that Triton would serve (it has a config.pbtxt), or None."""
    directory = model_dir(repo)
    versions = version_dirs(directory)
    if not versions or not (directory / CONFIG_FILE).is_file():
        return None
    return versions[0]


def next_version(model_directory: Path) -> int:
    """1 + the highest numeric directory of a model directory (any numeric directory, finished or not, so a
    number is never reused); 1 for a new repository."""
    versions = [int(p.name) for p in model_directory.glob("*") if p.name.isdigit() and p.is_dir()]
    return max(versions, default=0) + 1
