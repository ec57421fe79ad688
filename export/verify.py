"""Parity of an exported version against its torch model: logits (fp32, fp16) and generated sessions."""

# Shapes: B users, W beams, C candidates, K codes, R sessions, m items, L levels.

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.onnx_graphs import export_graphs
from onerec.config import BeamConfig
from onerec.data.sessions import Sessions
from onerec.data.sid import pad_histories
from onerec.model.generate import generate
from onerec.model.onerec import OneRecModel
from onerec.serving.engine import Engine, OnnxModel
from onerec.tokenizer.catalog import Catalog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityReport:
    """What `onerec export --verify` prints as JSON."""

    users: int
    beam_width: int
    max_abs_logit_fp32_vs_torch: float
    max_abs_logit_fp16_vs_fp32: float
    top_session_agreement: float  # exported engine's best session == torch reference's
    beam_set_overlap: float  # mean |engine's R sessions ∩ reference's R| / R
    fp16_top_session_agreement_vs_fp32: float

    def as_json(self) -> dict:
        return dict(self.__dict__)


def held_out_histories(catalog: Catalog, sessions: Sessions, users: int, max_len: int) -> list[np.ndarray]:
    """SID histories (n, L) of the first `users` held-out users with a known history item, <= max_len."""
    out = []
    for i in range(len(sessions)):
        sids = catalog.known_sids(sessions.history_of(i))[:max_len]
        if len(sids):
            out.append(sids)
        if len(out) == users:
            break
    return out


@torch.inference_mode()
def logit_gap(model: OneRecModel, onnx: OnnxModel, histories: list[np.ndarray], beams: int = 4,
              seed: int = 0) -> float:
    """Max |logit difference| between torch `decode_step` and the ONNX decoder over one full session of
    random tokens and beam reorders (shared and per-beam candidates alternate), after the ONNX encoder; the
    positions whose next token is BOS are stepped but not compared (beam search never reads their logits)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    history, mask = pad_histories(histories, cfg.history_len)  # (B, N, L), (B, N)
    B = history.shape[0]
    state = model.init_state(model.encode(history, mask), mask, beams)  # model: fp32, eval, CPU (load_model)
    step = onnx.start(history.numpy(), mask.numpy(), beams)
    gap = 0.0
    for p in range(cfg.decoder_len - 1):
        tokens = torch.randint(0, cfg.codes, (B, beams), generator=gen)
        beam_idx = torch.randint(0, beams, (B, beams), generator=gen)
        shape = (1, 1, cfg.codes) if p % 2 == 0 else (B, beams, min(cfg.codes, 7))
        candidates = torch.randint(0, cfg.codes, shape, generator=gen)
        want, state = model.decode_step(tokens, state, beam_idx, candidates)  # (B, W, C)
        got = step(tokens, beam_idx, candidates)
        if p % (cfg.levels + 1) != cfg.levels:  # the last code's position predicts BOS: its logits mean nothing
            gap = max(gap, float((want - got).abs().max()))
    return gap


def session_agreement(a: list, b: list) -> tuple[float, float]:
    """(fraction of users whose best sessions are equal, mean overlap of their session sets)."""
    top, overlap = [], []
    for x, y in zip(a, b, strict=True):
        xs, ys = x.sessions[0].cpu().numpy(), y.sessions[0].cpu().numpy()  # (R, m, L)
        top.append(bool(np.array_equal(xs[0], ys[0])))
        sx = {s.tobytes() for s in xs if s[0, 0] >= 0}
        sy = {s.tobytes() for s in ys if s[0, 0] >= 0}
        overlap.append(len(sx & sy) / max(len(sx), 1))
    return float(np.mean(top)), float(np.mean(overlap))


def verify(model: OneRecModel, version_dir: Path, sessions: Sessions, users: int = 32,
           beam: BeamConfig | None = None) -> ParityReport:
    """Compare the exported version (whatever its precision) and both precisions' graphs with torch."""
    engine = Engine(version_dir, device="cpu")
    beam = beam or BeamConfig()
    histories = held_out_histories(engine.catalog, sessions, users, model.cfg.history_len)
    if not histories:
        raise ValueError("no held-out user has a history item known to the catalog")
    graphs: dict[str, OnnxModel] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            directory = Path(tmp) / precision
            directory.mkdir()
            export_graphs(model, directory, precision)
            graphs[precision] = OnnxModel(directory, model.cfg, precision, device="cpu")
        gap32 = logit_gap(model, graphs["fp32"], histories[:4])
        gap16 = logit_gap(model, graphs["fp16"], histories[:4])  # vs torch fp32 = vs the fp32 graph +- gap32
        queries = [engine.query(h, beam.beam_width, beam.num_sessions, beam.exclude_history) for h in histories]
        served = [engine.generate([q])[0] for q in queries]
        exclude = [engine.catalog.trie.leaf_of(h) for h in histories]
        reference = [
            generate(model, engine.catalog.trie, [h], beam, exclude=[e[e >= 0]], session_len=engine.session_len)
            for h, e in zip(histories, exclude, strict=True)
        ]
        top, overlap = session_agreement(served, reference)
        other = "fp16" if engine.manifest.precision == "fp32" else "fp32"
        engine.model = graphs[other]
        served_other = [engine.generate([q])[0] for q in queries]
        fp16_top, _ = session_agreement(served_other, served)
    logger.info("verified %s on %d users", version_dir, len(histories))
    return ParityReport(len(histories), beam.beam_width, gap32, gap16, top, overlap, fp16_top)
