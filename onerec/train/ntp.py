"""Next-token training of the encoder-decoder on target sessions: batching, the loop, checkpoints, resume.

One process, or several under torchrun (`onerec.train.distributed`): every rank draws the same global batches and
trains on its shard of each with DistributedDataParallel; rank 0 validates and writes the checkpoint, the model and
the step log (checkpoint_dir/steps.jsonl: one JSON line per optimizer step with the global batch's loss).

Legend: S sessions, B batch, N history positions, m items per session, L levels, K codes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from onerec.config import BeamConfig, ModelConfig, Preset, TrainConfig, save_json, to_dict
from onerec.data.sid import SidSessions
from onerec.device import resolve_device
from onerec.errors import UsageError
from onerec.model.onerec import ModelOutput, OneRecModel, attribute_grid, load_model, save_model
from onerec.tokenizer.catalog import Catalog
from onerec.train.distributed import Cluster, RoutingTap, global_loss, shard

log = logging.getLogger(__name__)

STEPS = "steps.jsonl"  # in the checkpoint directory: {"step", "epoch", "loss", "aux", "lr"} per optimizer step


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar history length (less padding), in shuffled order."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 32
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def shuffled_targets(targets: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """targets (B, m, L) with each row's real items (code >= 0) in a random order, padding (-1) kept last."""
    B, m, _ = targets.shape
    keys = rng.random((B, m)) + (targets[:, :, 0] < 0).numpy() * 2.0  # (B, m): padded items sort after real ones
    order = torch.from_numpy(np.argsort(keys, axis=1, kind="stable"))  # (B, m)
    return targets.gather(1, order.unsqueeze(-1).expand_as(targets))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 10% of it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class ValidCodes:
    """The trie's valid next codes, for the constrained loss (`TrainConfig.constrained_loss`): each level's softmax
    over the children of the true prefix only, the choice trie-constrained beam search makes."""

    def __init__(self, catalog: Catalog, device: torch.device) -> None:
        self.trie = catalog.trie
        self.masks = [torch.from_numpy(m).to(device) for m in self.trie.child_masks()]  # L x (n_l, K)

    def allowed(self, targets: torch.Tensor) -> torch.Tensor:
        """targets (B, m, L), -1 rows padding -> (B, m, L, K) bool: the codes valid at each target position
        (every code at a padded position, which the loss skips anyway)."""
        B, m, L = targets.shape
        sids = targets.reshape(-1, L).cpu().numpy()  # (B*m, L)
        nodes = torch.from_numpy(self.trie.path_nodes(np.maximum(sids, 0)))  # (B*m, L); targets are catalog SIDs
        padded = torch.from_numpy(sids[:, 0] < 0)  # (B*m,)
        rows = [self.masks[level][nodes[:, level].clamp_min(0).to(self.masks[level].device)] for level in range(L)]
        allowed = torch.stack(rows, dim=1)  # (B*m, L, K)
        allowed[padded.to(allowed.device)] = True
        return allowed.view(B, m, L, -1)

    def constrain(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits (B, m, L, K) with the codes outside the true prefix's children at the dtype's lowest value."""
        return logits.masked_fill(~self.allowed(targets), torch.finfo(logits.dtype).min)


def session_loss(model: OneRecModel, history, mask, targets,
                 valid: ValidCodes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the m*L code positions (padding, code -1, skipped), and the MoE
    auxiliary loss. Padding only ends a target, so the inputs fed in its place (code 0) reach only positions
    that are skipped too (the decoder is causal). With `valid`, each softmax is over the valid codes only."""
    return code_loss(model(history, mask, targets.clamp_min(0)), targets, valid)  # logits (B, m, L, K)


def code_loss(out: ModelOutput, targets: torch.Tensor,
              valid: ValidCodes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits (B, m, L, K) against targets (B, m, L) (-1 skipped; with `valid` over the valid
    codes only), and the MoE auxiliary loss."""
    logits = out.logits if valid is None else valid.constrain(out.logits, targets)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    return ce, out.aux_loss


def position_targets(history: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A whole sequence's targets for `TrainConfig.all_positions`: history (B, N, L) most recent first, mask (B, N),
    targets (B, m, L) of the window -> (B, N, L): position 0 predicts the window's first target item, position n
    the history item after it (n - 1); -1 at padding, which the loss skips."""
    shifted = torch.cat([targets[:, :1], history[:, :-1]], dim=1)  # (B, N, L)
    return torch.where(mask[..., None], shifted, torch.full_like(shifted, -1))


def positions_loss(model: OneRecModel, history, mask, targets,
                   valid: ValidCodes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`session_loss` of every history position at once (`OneRecModel.forward_positions`): the mean cross-entropy
    over the real positions' L codes, and the MoE auxiliary loss."""
    every = position_targets(history, mask, targets)  # (B, N, L)
    return code_loss(model.forward_positions(history, mask, every.clamp_min(0)), every, valid)  # (B, N, L, K)


class EveryPosition(torch.nn.Module):
    """`model.forward_positions` as a module's forward, so that DDP can wrap it (DDP syncs the gradients of what
    its wrapper's forward ran): data-parallel `TrainConfig.all_positions`."""

    def __init__(self, model: OneRecModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        return self.model.forward_positions(history, mask, targets)


@torch.no_grad()
def evaluate_loss(model: OneRecModel, data: SidSessions, batch_size: int, device: torch.device,
                  valid: ValidCodes | None = None) -> float:
    """Mean cross-entropy over `data` (no dropout); with `valid`, the constrained one training minimises."""
    if len(data) == 0:
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    order = np.argsort(data.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        history, mask, targets = (t.to(device) for t in data.batch(idx, model.cfg.history_len))
        ce, _ = session_loss(model, history, mask, targets, valid)
        total += float(ce) * len(idx)
        count += len(idx)
    return total / count


SELECT_METRICS = ("val_loss", "recall@10", "ndcg@10")


def validation_rows(total: int, users: int) -> np.ndarray:
    """`users` of `total` session rows spread evenly (row i * total // count), or all of them: the first rows of
    a file sorted by user id are no sample (on Beauty its first 2,000 users score half the others and did not
    tell a worse epoch from a better one; docs/QUALITY.md)."""
    count = min(total, users)
    return np.arange(count, dtype=np.int64) * total // count if count else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def ranking_metrics(model: OneRecModel, catalog: Catalog, data: SidSessions, beam: BeamConfig, users: int,
                    device: torch.device) -> dict[str, float]:
    """Recall@10 / NDCG@10 of the ten next items beam search ranks (session_len 1, history excluded) against
    each target's items, on `users` sessions spread evenly over `data` (`validation_rows`). Scored in leaf space
    (one leaf per SID): the signal that picks an epoch, not a reported number (that is `onerec evaluate`'s)."""
    from onerec.eval import score_recommendations
    from onerec.model.generate import generate

    if len(data) == 0:
        return {"recall@10": float("nan"), "ndcg@10": float("nan")}
    model.eval()
    ranked = dataclasses.replace(beam, beam_width=max(beam.beam_width, 10), num_sessions=10, exclude_history=True)
    trie = catalog.trie
    lists: list[list[int]] = []
    targets: list[list[int]] = []
    data = data.take(validation_rows(len(data), users))
    for start in range(0, len(data), 32):
        idx = np.arange(start, min(start + 32, len(data)))
        histories = data.histories(idx)  # [(n, L)] most recent first
        result = generate(model, trie, histories, ranked, exclude=[trie.leaf_of(h) for h in histories],
                          device=device, session_len=1)
        leaves = result.leaves[:, :, 0].cpu().numpy()  # (b, 10)
        for row, i in enumerate(idx):
            lists.append([int(leaf) for leaf in leaves[row] if leaf >= 0])
            items = data.targets[i]  # (m, L), -1 rows after a padded target's end
            targets.append(trie.leaf_of(items[items[:, 0] >= 0]).tolist())
    recall, ndcg = score_recommendations(lists, targets, 10)
    return {"recall@10": recall, "ndcg@10": ndcg}


# --- checkpoints ------------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, model: OneRecModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Model + optimizer (safetensors) + progress (JSON); the progress file is written last."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory)
    opt = optimizer.state_dict()
    tensors = {
        f"{pid}.{name}": value.detach().cpu().contiguous()
        for pid, slots in opt["state"].items()
        for name, value in slots.items()
        if torch.is_tensor(value)
    }
    save_file(tensors, str(directory / "optimizer.safetensors"))
    save_json(directory / "optimizer.json", {"param_groups": opt["param_groups"]})
    save_json(directory / "progress.json", state)


def load_checkpoint(directory: Path, device: torch.device) -> tuple[OneRecModel, dict, dict]:
    """(model, optimizer state_dict, progress) from `save_checkpoint`; UsageError naming a corrupt file."""
    progress_path = directory / "progress.json"
    if not progress_path.is_file():
        raise UsageError(f"--resume: no checkpoint at {directory}")
    model = load_model(directory, device=str(device))
    try:
        progress = json.loads(progress_path.read_text())
        groups = json.loads((directory / "optimizer.json").read_text())["param_groups"]
        flat = load_file(str(directory / "optimizer.safetensors"), device=str(device))
    except Exception as exc:  # noqa: BLE001 - any failure here means a corrupt checkpoint
        raise UsageError(f"{directory}: corrupt checkpoint ({exc})") from exc
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value.cpu() if name == "step" else value
    return model, {"state": state, "param_groups": groups}, progress


EMA_DIR = "ema"  # in the checkpoint directory: the averaged weights (TrainConfig.ema_decay > 0)


def weight_average(model: OneRecModel, cfg: TrainConfig, checkpoint_dir: Path, resume: bool,
                   steps: int) -> AveragedModel | None:
    """The EMA of `model`'s weights (`cfg.ema_decay`), or None when off; on resume, the checkpoint's average after
    `steps` updates."""
    if cfg.ema_decay <= 0:
        return None
    if not 0 < cfg.ema_decay < 1:
        raise UsageError(f"train.ema_decay: must lie in [0, 1), got {cfg.ema_decay}")
    device = next(model.parameters()).device
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    if resume and steps > 0:
        averaged.module.load_state_dict(load_model(checkpoint_dir / EMA_DIR, device=str(device)).state_dict())
        averaged.n_averaged.fill_(steps)
    return averaged


def append_steps(path: Path, records: list[dict[str, Any]]) -> None:
    """Add one epoch's step records to the step log (before the checkpoint's progress file is written)."""
    with path.open("a") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)


def read_steps(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The step log's records (those with step <= `upto` when given); [] without a log."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if upto is None or r["step"] <= upto]


# --- the loop ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    best_val_loss: float
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class ItemAttributes:
    """Each catalogue item's attribute rows (1..table_rows-1), in the catalog's video order
    (`onerec.data.attributes.attribute_lists`)."""

    rows: list[list[int]]
    table_rows: int


def model_config_for(preset: Preset, catalog: Catalog, attributes: ItemAttributes | None = None) -> ModelConfig:
    """The preset's model shapes with the catalog's L and K, the data's session length and, where the preset reads
    item attributes and the data has them, the attribute table's shape."""
    cfg = dataclasses.replace(
        preset.model, levels=catalog.levels, codes=catalog.num_codes, session_len=preset.data.session_len
    )
    if cfg.item_attributes and attributes is not None:
        width = max(map(len, attributes.rows), default=0)
        if width > 0:
            cfg = dataclasses.replace(cfg, attribute_rows=attributes.table_rows, attributes_per_item=width)
    return cfg


def train(
    preset: Preset,
    catalog: Catalog,
    train_data: SidSessions,
    val_data: SidSessions,
    checkpoint_dir: Path,
    best_dir: Path,
    resume: bool = False,
    progress: bool = True,
    cluster: Cluster | None = None,
    attributes: ItemAttributes | None = None,
) -> TrainResult:
    """Train with AdamW on next-token CE + aux; checkpoint each epoch; keep the best epoch's model by
    `cfg.select` (validation loss, or the validation ranking of the next items).

    With a `cluster` of several processes (torchrun), each rank trains on its shard of every global batch (the same
    batches as one process: `cfg.batch_size` is the global batch) under DDP, with the loss whose averaged gradient
    is the whole batch's (`onerec.train.distributed.combine`); rank 0 validates and writes, the others wait. With
    dropout 0 the per-step losses equal one process's up to float32 summation order (tests/train/
    test_distributed.py); with dropout each rank draws its own masks."""
    cluster = cluster or Cluster()
    cfg = preset.train
    if cfg.all_positions and not preset.model.causal_encoder:
        raise UsageError("train.all_positions needs model.causal_encoder (a position must not see later items)")
    if cfg.select not in SELECT_METRICS:
        raise UsageError(f"train.select: unknown metric {cfg.select!r}; use one of {', '.join(SELECT_METRICS)}")
    if len(train_data) == 0:
        raise UsageError("no training sessions: the data has too few positives per user")
    device = cluster.device(resolve_device(cfg.device))
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    if resume:
        model, opt_state, state = load_checkpoint(checkpoint_dir, device)
        if state.get("train") != to_dict(cfg):
            raise UsageError(f"--resume: checkpoint {checkpoint_dir} was trained with another config; drop --resume")
    else:
        model, opt_state = OneRecModel(model_config_for(preset, catalog, attributes)).to(device), None
        if model.cfg.attribute_rows > 0:
            assert attributes is not None
            grid = attribute_grid(catalog.sids, attributes.rows, model.cfg)  # (item_buckets, A)
            model.set_item_attributes(torch.as_tensor(grid, device=device), torch.as_tensor(catalog.sids))
        state = {"epoch": 0, "step": 0, "best_val_loss": float("inf"), "best_epoch": -1, "history": []}
        state["train"] = to_dict(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # decoupled decay
    averaged = weight_average(model, cfg, checkpoint_dir, resume, state["step"])
    judged = model if averaged is None else averaged.module  # what is validated, selected and saved
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    steps_log = checkpoint_dir / STEPS
    if cluster.is_main:  # the log holds the checkpoint's steps: none when starting afresh
        kept = read_steps(steps_log, upto=state["step"]) if resume else []
        steps_log.unlink(missing_ok=True)
        if kept:
            append_steps(steps_log, kept)
    valid = ValidCodes(catalog, device) if cfg.constrained_loss else None
    net: torch.nn.Module = model
    tap = None
    if cluster.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            EveryPosition(model) if cfg.all_positions else model,
            device_ids=[device.index] if device.type == "cuda" else None)
        tap = RoutingTap(model)
    log.info("training %d sessions (%d val) for %d epochs on %s%s", len(train_data), len(val_data), cfg.epochs, device,
             f" x {cluster.world_size} processes" if cluster.distributed else "")
    started = time.time()
    for epoch in range(state["epoch"], cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        # dropout stream per epoch (and rank): resume reproduces it
        torch.manual_seed(cfg.seed * 100_003 + epoch + cluster.rank * 1_000_000_007)
        model.train()
        losses, auxes, steps = [], [], []
        bar = tqdm(epoch_batches(train_data.lengths, cfg.batch_size, rng), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and cluster.is_main), leave=False)
        for idx in bar:
            lr = lr_at(state["step"], total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mine, weight = shard(len(idx), cluster)  # one process: every position, weight 1
            history, mask, targets = train_data.batch(idx[mine], model.cfg.history_len)
            if cfg.shuffle_targets:  # drawn over the global batch: every rank's rng stays in step
                targets = shuffled_targets(torch.from_numpy(train_data.targets[idx]), rng)[mine]
            history, mask, targets = history.to(device), mask.to(device), targets.to(device)
            if tap is None:
                loss_of = positions_loss if cfg.all_positions else session_loss
                ce, aux = loss_of(model, history, mask, targets, valid)
                loss = ce + model.cfg.aux_loss_coef * aux
            else:
                if cfg.all_positions:  # every position's target (b, N, L), -1 at padding
                    targets = position_targets(history, mask, targets)
                logits = net(history, mask, targets.clamp_min(0)).logits  # (b, m or N, L, K)
                if valid is not None:
                    logits = valid.constrain(logits, targets)
                loss, ce_value, aux_value = global_loss(logits, targets, tap.take(), weight,
                                                        model.cfg.aux_loss_coef, cluster)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)
            state["step"] += 1
            if tap is None:
                ce_value, aux_value = ce.item(), aux.item()
            losses.append(ce_value)
            auxes.append(aux_value)
            steps.append({"step": state["step"], "epoch": epoch + 1, "loss": ce_value, "aux": aux_value, "lr": lr})
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if not cluster.is_main:  # rank 0 validates and writes; the next epoch starts once it has
            state["epoch"] = epoch + 1
            cluster.barrier()
            continue
        val_loss = evaluate_loss(judged, val_data, cfg.batch_size * 2, device, valid)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "aux_loss": float(np.mean(auxes)),
                  "val_loss": val_loss}
        score = -val_loss  # higher is better
        if cfg.select != "val_loss":
            ranking = ranking_metrics(judged, catalog, val_data, preset.beam, cfg.select_users, device)
            record.update({f"val_{name}": value for name, value in ranking.items()})
            score = ranking[cfg.select]
        record["seconds"] = round(time.time() - started, 1)
        state["history"].append(record)
        log.info("epoch %d/%d train_loss %.4f val_loss %.4f%s", epoch + 1, cfg.epochs, record["train_loss"], val_loss,
                 "" if cfg.select == "val_loss" else f" val {cfg.select} {score:.4f}")
        state["epoch"] = epoch + 1
        if not score <= state.get("best_score", float("-inf")):  # also true without validation data (nan)
            state["best_val_loss"], state["best_epoch"], state["best_score"] = val_loss, epoch + 1, score
            save_model(judged, best_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if averaged is not None:  # before the progress file: a checkpoint is whole once progress.json is
            save_model(judged, checkpoint_dir / EMA_DIR)
        append_steps(steps_log, steps)
        save_checkpoint(checkpoint_dir, model, optimizer, state)
        cluster.barrier()
    if tap is not None:
        tap.close()
    return TrainResult(
        best_val_loss=float(state["best_val_loss"]),
        best_epoch=int(state["best_epoch"]),
        history=list(state["history"]),
        seconds=time.time() - started,
    )
