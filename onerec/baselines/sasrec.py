"""SASRec+ (Kang & McAuley 2018; Klenitskiy & Vasilev 2023): causal self-attention, full cross-entropy over items."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from onerec.baselines.protocol import HeldOut, Scorer, TrainMatrix, evaluate_scorer

log = logging.getLogger(__name__)

# Legend: B batch, T positions (<= max_len), d hidden, N catalogue items. Item row r is token r + 1; 0 pads.


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int = 64  # d
    blocks: int = 2
    heads: int = 1
    max_len: int = 200  # T: the most recent items a sequence sees
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 20  # epochs without a better validation metric before stopping
    monitor: str = "ndcg@10"  # the validation metric that picks the epoch (a key of `evaluate_scorer`)
    seed: int = 0
    device: str = "cpu"


@dataclass
class SASRecResult:
    model: SASRec
    best_epoch: int
    best_val: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class SASRec(nn.Module):
    """Item + position embeddings, `blocks` pre-norm causal Transformer layers, logits = hidden @ item tableᵀ."""

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = cfg.max_len
        self.items = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, dim_feedforward=cfg.hidden, dropout=cfg.dropout,
                                           activation="relu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.items.weight, std=cfg.hidden**-0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded tokens -> (B, T, d); position t only sees positions <= t, so padding is inert.

        Positions count back from each sequence's last item (0 = most recent), as SASRec's left-padded window."""
        t = tokens.shape[1]
        lengths = (tokens > 0).sum(dim=1, keepdim=True)  # (B, 1)
        pos = (lengths - 1 - torch.arange(t, device=tokens.device)[None]).clamp(min=0)  # (B, T)
        x = self.items(tokens) * self.items.embedding_dim**0.5 + self.positions(pos)  # (B, T, d)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)  # (T, T)
        return self.norm(self.encoder(self.dropout(x), mask=causal, is_causal=True))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., N) scores of every catalogue item (the padding token dropped)."""
        return h @ self.items.weight[1:].T


def training_windows(sequences: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Each chronological sequence cut from its end into windows of <= max_len + 1 tokens (input + next item),
    consecutive windows sharing one item, so every training positive is a target once; windows < 2 dropped."""
    windows = []
    for seq in sequences:
        tokens = np.asarray(seq, dtype=np.int64) + 1
        end = len(tokens)
        while end >= 2:
            windows.append(tokens[max(0, end - max_len - 1) : end])
            end -= max_len
    return windows


def _pad(windows: list[np.ndarray]) -> torch.Tensor:
    """Right-pad with 0: (B, T)."""
    t = max(len(w) for w in windows)
    out = np.zeros((len(windows), t), dtype=np.int64)
    for i, w in enumerate(windows):
        out[i, : len(w)] = w
    return torch.from_numpy(out)


def sasrec_scorer(model: SASRec, device: torch.device | str = "cpu") -> Scorer:
    """Histories (most recent first) -> (b, N) next-item logits after the last `max_len` of them."""

    @torch.inference_mode()
    def score(histories: list[np.ndarray]) -> np.ndarray:
        model.eval()
        windows = [np.asarray(h[: model.max_len][::-1], dtype=np.int64) + 1 for h in histories]  # chronological
        tokens = _pad(windows).to(device)  # (b, T)
        last = torch.tensor([len(w) - 1 for w in windows], device=device)  # (b,)
        h = model.hidden(tokens)[torch.arange(len(windows), device=device), last]  # (b, d)
        return model.logits(h).float().cpu().numpy()  # (b, N)

    return score


def train_sasrec(data: TrainMatrix, val: HeldOut, cfg: SASRecConfig | None = None,
                 progress: bool = False) -> SASRecResult:
    """Full cross-entropy next-item training on every position of the training sequences; after each epoch the
    validation users are ranked with the shared protocol, and the epoch with the best `cfg.monitor` is kept
    (stopping after `cfg.patience` epochs without improvement)."""
    cfg = cfg or SASRecConfig()
    started = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    model = SASRec(data.num_items, cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    windows = training_windows(data.sequences, cfg.max_len)
    if not windows:
        raise ValueError("SASRec: no training sequence has two or more positives")
    log.info("sasrec: %d windows, %d parameters", len(windows), sum(p.numel() for p in model.parameters()))
    best_state, best_val, best_epoch, stale = copy.deepcopy(model.state_dict()), -1.0, 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.max_epochs + 1), desc="sasrec", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = rng.permutation(len(windows))
        total, count = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = _pad([windows[i] for i in order[start : start + cfg.batch_size]]).to(device)  # (B, T+1)
            inputs, targets = batch[:, :-1], batch[:, 1:] - 1  # (B, T); -1 where the target is padding
            real = targets >= 0  # (B, T) the logits of padded positions are never computed
            logits = model.logits(model.hidden(inputs)[real])  # (P, N), P real positions
            loss = nn.functional.cross_entropy(logits, targets[real])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = int(real.sum())
            total += float(loss.detach()) * n
            count += n
        metrics = evaluate_scorer(sasrec_scorer(model, device), data, val)
        history.append({"epoch": epoch, "loss": total / count, **metrics})
        score = metrics[cfg.monitor]
        if score > best_val:
            best_state, best_val, best_epoch, stale = copy.deepcopy(model.state_dict()), score, epoch, 0
        else:
            stale += 1
        bar.set_postfix(loss=f"{total / count:.3f}", val=f"{score:.4f}", best=f"{best_val:.4f}@{best_epoch}")
        log.info("sasrec epoch %d: loss %.4f val %s %.4f", epoch, total / count, cfg.monitor, score)
        if stale >= cfg.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.time() - started
    log.info("sasrec: best epoch %d (val %s %.4f) of %d in %.0fs", best_epoch, cfg.monitor, best_val, len(history),
             seconds)
    return SASRecResult(model=model, best_epoch=best_epoch, best_val=best_val, history=history, seconds=seconds)
