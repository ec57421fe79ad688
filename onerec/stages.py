"""The pipeline stages, one function each: prepare, tokenize, train, evaluate, train_reward, align on a `RunDir`."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from onerec.config import DataConfig, Preset, TokenizerConfig, from_dict, get_preset, save_json, to_dict
from onerec.data.interactions import item_rows
from onerec.data.sources import SourceOptions, get_source, item_attributes
from onerec.errors import UsageError
from onerec.runs import RunDir, staging_dir

if TYPE_CHECKING:  # torch and the recipes are imported inside the stages: importing this module stays light
    from onerec.align.ipa import AlignConfig, IterationResult
    from onerec.eval import EvalResult
    from onerec.tokenizer.catalog import Catalog
    from onerec.train.ntp import ItemAttributes, TrainResult

log = logging.getLogger(__name__)

C = TypeVar("C")
SPLITS = ("train", "val", "test")
# what `onerec train-reward` prints, in this order: the kept epoch's validation metrics, counts, seconds
REWARD_SUMMARY = ("val_bce", "val_auc", "val_auc_rated", "best_epoch", "sessions", "seconds")


@dataclass(frozen=True)
class Completed:
    """A marked stage's outcome: what it recorded in RUN/<stage>.json, and whether `reuse` kept an earlier one.

    `marker` is the payload the stage wrote, or, when reused, the marker file as it stands (which also holds
    `stage` and `finished_at`)."""

    marker: dict[str, Any]
    reused: bool = False


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` scored (also written to RUN/eval.json)."""

    result: EvalResult
    split: str
    beam_width: int
    checkpoint: Path


def _override(config: C, **values: Any) -> C:
    """`config` with the given fields replaced, skipping the ones left at None (not given)."""
    return dataclasses.replace(config, **{k: v for k, v in values.items() if v is not None})


def run_preset(run: RunDir, preset: str | None) -> str:
    """The preset a stage uses: the one asked for, else the one prepare chose for the data (runs prepared before
    prepare recorded it: small)."""
    if preset is not None:
        return preset
    chosen = run.read_marker("prepare").get("preset", "small")
    log.info("preset %s (chosen by prepare for this data; --preset overrides)", chosen)
    return chosen


def _reused(run: RunDir, stage: str, what: Path, command: str | None = None) -> Completed:
    """`reuse` and the stage is complete: its marker as it stands (logged as `command`, default the stage)."""
    log.info("%s: reusing %s", command or stage, what)
    return Completed(run.read_marker(stage), reused=True)


# --- prepare ----------------------------------------------------------------------------------------------


def prepare(run: RunDir, source: str = "movielens", options: SourceOptions | None = None, preset: str | None = None,
            force: bool = False, reuse: bool = False) -> Completed:
    """Read interactions from `source` (`onerec.data.sources`), build sessions (history <= 256 positives, target =
    next 5) and the time split, and write them into a new run directory (replacing it only with `force`).
    `preset` defaults to the source's (`small`; `small-seq` for sequences) and is recorded in prepare.json: the
    later stages use it when they are not given one."""
    from onerec.data.sessions import build_sessions

    options = options or SourceOptions()
    out = run.root
    if run.is_complete("prepare") and reuse:
        return _reused(run, "prepare", out)
    if out.exists() and not force:
        raise UsageError(f"--out: {out} already exists; pass --force to replace it or --reuse to keep it")
    reader = get_source(source)
    preset = preset or reader.preset
    data_cfg = reader.data_config(get_preset(preset).data)
    interactions = reader.load(options)
    origin = reader.origin(options)
    split = build_sessions(interactions, data_cfg)
    if len(split.test) == 0:
        raise UsageError(f"--path: {options.path} yields no test sessions (too few positive interactions per user)")
    with staging_dir(out) as tmp:
        staged = RunDir(tmp)
        staged.data.mkdir()
        interactions.save(staged.interactions)
        split.train_interactions.save(staged.train_interactions)
        for name in SPLITS:
            getattr(split, name).save(staged.sessions(name))
        stats = {
            "interactions": len(interactions),
            "users": int(np.unique(interactions.users).size),
            "items": int(np.unique(interactions.items).size),
            "sessions": {name: len(getattr(split, name)) for name in SPLITS},
        }
        marker = {**origin, "preset": preset, "data": to_dict(data_cfg), "stats": stats}
        staged.complete("prepare", marker)
    log.info("prepare: %s -> %s %s", origin["source"], out, json.dumps(stats["sessions"]))
    return Completed(marker)


# --- tokenize ---------------------------------------------------------------------------------------------


def tokenize(run: RunDir, preset: str | None = None, codes: int | None = None, levels: int | None = None,
             iters: int | None = None, device: str | None = None, embeddings: Path | None = None,
             reuse: bool = False, unique: bool | None = None, window: int | None = None,
             attribute_weight: float | None = None) -> Completed:
    """Embed items (PPMI-SVD, or the `embeddings` .npy), balanced residual k-means -> SIDs, and write the catalog;
    `codes`/`levels`/`iters`/`device`/`window` (`cooccurrence_window`)/`attribute_weight` override the preset's
    tokenizer settings."""
    from onerec.data.attributes import load_item_attributes
    from onerec.data.embeddings import load_embeddings, ppmi_svd_embeddings
    from onerec.data.interactions import Interactions
    from onerec.tokenizer.catalog import Catalog
    from onerec.tokenizer.residual import fit_shape, residual_quantize

    run.require("prepare")
    if run.is_complete("tokenize") and reuse:
        return _reused(run, "tokenize", run.catalog)
    preset = run_preset(run, preset)
    cfg = _override(get_preset(preset).tokenizer, codes=codes, levels=levels, iters=iters, device=device,
                    unique=unique, cooccurrence_window=window, attribute_weight=attribute_weight)
    _check_tokenizer(cfg)
    all_interactions = Interactions.load(run.interactions)
    train_interactions = Interactions.load(run.train_interactions)
    video_ids = np.unique(all_interactions.items)  # (N,) every item seen, ascending
    if len(video_ids) == 0:
        raise UsageError(f"{run.interactions}: empty catalog (no items)")
    cfg = fit_shape(cfg, len(video_ids), codes_given=codes is not None, levels_given=levels is not None)
    if cfg.codes > len(video_ids):
        raise UsageError(f"--codes: K={cfg.codes} is larger than the item count N={len(video_ids)}")
    attributes_file = None
    if embeddings is not None:
        vectors = load_embeddings(embeddings, len(video_ids))
    else:
        if cfg.attribute_weight > 0:
            attributes_file = item_attributes(run.read_marker("prepare"))
        attributes = None if attributes_file is None else load_item_attributes(attributes_file, video_ids)
        vectors = ppmi_svd_embeddings(train_interactions, video_ids, cfg.embedding_dim, seed=cfg.seed,
                                      attributes=attributes, attribute_weight=cfg.attribute_weight,
                                      window=cfg.cooccurrence_window)
    run.invalidate_from("tokenize")  # inputs are valid: from here the old catalog is being replaced
    np.save(run.embeddings, vectors)
    result = residual_quantize(vectors, cfg)
    popularity = _counts(train_interactions.items, video_ids)
    catalog = Catalog.build(video_ids, result.sids, popularity, cfg.codes)
    catalog.save(run.catalog)
    marker = {"preset": preset, "tokenizer": to_dict(cfg), "report": result.report,
              "embeddings": str(embeddings) if embeddings else "ppmi-svd",
              "attributes": str(attributes_file) if attributes_file else None, "content_hash": catalog.content_hash}
    run.complete("tokenize", marker)
    log.info("tokenize: %d items -> %d SIDs (collision rate %.4f, coverage %.4f), catalog %s", len(video_ids),
             catalog.num_leaves, result.report["collision_rate"], result.report["coverage"], catalog.content_hash[:12])
    return Completed(marker)


def _check_tokenizer(cfg: TokenizerConfig) -> None:
    if cfg.codes < 2:
        raise UsageError(f"--codes: must be >= 2, got {cfg.codes}")
    if cfg.levels < 1:
        raise UsageError(f"--levels: must be >= 1, got {cfg.levels}")
    if cfg.iters < 1:
        raise UsageError(f"--iters: must be >= 1, got {cfg.iters}")
    if cfg.attribute_weight < 0:
        raise UsageError(f"--attribute-weight: must be >= 0, got {cfg.attribute_weight}")
    if cfg.cooccurrence_window < 0:
        raise UsageError(f"--window: must be >= 0, got {cfg.cooccurrence_window}")


def _counts(items: np.ndarray, video_ids: np.ndarray) -> np.ndarray:
    """Occurrences of each of `video_ids` (ascending) in `items`."""
    rows = item_rows(video_ids, items)
    return np.bincount(rows[rows >= 0], minlength=len(video_ids)).astype(np.int64)


# --- train ------------------------------------------------------------------------------------------------


def train_preset(run: RunDir, preset: str | None = None, epochs: int | None = None, lr: float | None = None,
                 batch_size: int | None = None, seed: int | None = None, device: str | None = None) -> Preset:
    """The preset `train` trains with: the run's (or `preset`) with the overrides and the run's data config; a
    UsageError for a run without a catalog, an unknown preset or a non-positive setting (checked before a launch)."""
    run.require("tokenize")
    chosen = get_preset(run_preset(run, preset))
    train_cfg = _override(chosen.train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
    if train_cfg.epochs < 1 or train_cfg.batch_size < 1 or train_cfg.lr <= 0:
        raise UsageError("--epochs/--batch-size/--lr: must be positive")
    data_cfg = from_dict(DataConfig, run.read_marker("prepare")["data"])
    return dataclasses.replace(chosen, train=train_cfg, data=data_cfg)


def train(run: RunDir, preset: str | None = None, epochs: int | None = None, lr: float | None = None,
          batch_size: int | None = None, seed: int | None = None, device: str | None = None, resume: bool = False,
          reuse: bool = False, progress: bool = False) -> Completed:
    """Next-token training on the train sessions; keeps the best epoch by the preset's `train.select` (validation
    loss or the validation ranking) in RUN/model. The
    overrides replace the preset's training settings; `resume` continues from RUN/checkpoints/last.

    Under torchrun with several processes it trains data-parallel (`onerec.train.distributed`; the batch size is
    the global batch); rank 0 writes the checkpoints, RUN/model and the marker."""
    from onerec.data.sessions import Sessions, longest_per_user
    from onerec.data.sid import SidSessions
    from onerec.tokenizer.catalog import Catalog
    from onerec.train.distributed import process_group
    from onerec.train.ntp import train as train_model

    run.require("tokenize")
    if run.is_complete("train") and reuse:
        return _reused(run, "train", run.model)
    chosen = train_preset(run, preset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
    train_cfg = chosen.train
    catalog = Catalog.load(run.catalog)
    history_len = chosen.model.history_len
    train_sessions = Sessions.load(run.sessions("train"))
    if train_cfg.all_positions:  # one row per user, its whole sequence: every position is a target in one pass
        train_sessions = longest_per_user(train_sessions)
    train_data = SidSessions.from_sessions(train_sessions, catalog, history_len)
    val_data = SidSessions.from_sessions(Sessions.load(run.sessions("val")), catalog, history_len)
    attributes = train_attributes(run, chosen, catalog)
    with process_group(train_cfg.device) as cluster:
        if cluster.is_main:
            run.invalidate_from("train")
            if not resume:
                shutil.rmtree(run.checkpoint, ignore_errors=True)
        cluster.barrier()  # the other ranks read the checkpoint (resume) only once rank 0 has set the run up
        result = train_model(chosen, catalog, train_data, val_data, run.checkpoint, run.model, resume=resume,
                             progress=progress, cluster=cluster, attributes=attributes)
        marker = {"preset": chosen.name, "train": to_dict(train_cfg), "best_epoch": result.best_epoch,
                  "best_val_loss": result.best_val_loss, "history": result.history,
                  "seconds": round(result.seconds, 1), "catalog_hash": catalog.content_hash,
                  "processes": cluster.world_size}
        if cluster.is_main:
            run.complete("train", marker)
            log.info("train: best epoch %d (%s) in %.0fs -> %s", result.best_epoch,
                     selection_summary(result, train_cfg.select), result.seconds, run.model)
    return Completed(marker)


def selection_summary(result: TrainResult, select: str) -> str:
    """What picked the best epoch, for the log: "val_loss 4.4302", or "val ndcg@10 0.0563, val_loss 4.4302"."""
    loss = f"val_loss {result.best_val_loss:.4f}"
    if select == "val_loss":
        return loss
    best = next((h for h in result.history if h.get("epoch") == result.best_epoch), {})
    value = best.get(f"val_{select}")
    return f"val {select} {value:.4f}, {loss}" if isinstance(value, float) else loss


def train_attributes(run: RunDir, preset: Preset, catalog: Catalog) -> ItemAttributes | None:
    """The catalogue items' attributes for a preset whose model reads them (`ModelConfig.item_attributes`), from
    the source's attribute file (Amazon's `*_item2attributes.json`); None for other presets or sources."""
    from onerec.data.attributes import attribute_lists
    from onerec.train.ntp import ItemAttributes

    if not preset.model.item_attributes:
        return None
    path = item_attributes(run.read_marker("prepare"))
    if path is None:
        log.info("train: the source has no item attributes; the model reads the SIDs and per-item rows only")
        return None
    rows, table_rows = attribute_lists(path, catalog.video_ids)
    return ItemAttributes(rows=rows, table_rows=table_rows)


# --- evaluate ---------------------------------------------------------------------------------------------


def evaluate(run: RunDir, split: str = "test", checkpoint: Path | None = None, beam_width: int | None = None,
             limit: int | None = None, device: str = "auto", reward: bool = True,
             progress: bool = False, new_item_share: float = 0.0) -> Evaluation:
    """Recall@5 / NDCG@5 of generated sessions vs the held-out `split`'s targets, beside a most-popular baseline;
    with `reward` and a reward model (`train_reward`), also its scores of the generated sessions. Writes
    RUN/eval.json. `checkpoint` is the model directory (default RUN/model); `beam_width` overrides the preset's;
    `new_item_share` maps the answers as the gateway does with ONEREC_NEW_ITEM_SHARE (new items by prefix match)."""
    from onerec.data.sessions import Sessions
    from onerec.device import resolve_device
    from onerec.eval import evaluate as run_eval
    from onerec.model.onerec import load_model
    from onerec.reward.train import STAGE as REWARD
    from onerec.tokenizer.additions import extends
    from onerec.tokenizer.catalog import Catalog

    run.require("train")
    trained = run.read_marker("train")
    beam = get_preset(trained["preset"]).beam
    if beam_width is not None:
        if not 1 <= beam_width <= 1024:
            raise UsageError(f"--beam-width: must be in [1, 1024], got {beam_width}")
        beam = dataclasses.replace(beam, beam_width=beam_width)
    if not 0.0 <= new_item_share <= 1.0:
        raise UsageError(f"--new-item-share: must be in [0, 1], got {new_item_share}")
    catalog = Catalog.load(run.catalog)
    if not extends(run.catalog, str(trained.get("catalog_hash"))):  # the trained catalog, or grown by `catalog add`
        raise UsageError(f"{run.catalog}: catalog hash differs from the one the model was trained on")
    dev = resolve_device(device)
    checkpoint = checkpoint or run.model
    model = load_model(checkpoint, device=str(dev))
    scorer = None
    if reward and run.is_complete(REWARD):  # `train_reward` ran: score every generated session
        from onerec.reward.train import load_reward, session_scorer

        scorer = session_scorer(load_reward(run.root, device=dev))
    protocol = run.read_marker("prepare")["data"].get("protocol", "session")
    result = run_eval(model, catalog, Sessions.load(run.sessions(split)), beam, limit=limit, device=dev,
                      progress=progress, scorer=scorer, protocol=protocol, new_item_share=new_item_share)
    save_json(run.eval, {**result.as_json(), "split": split, "beam_width": beam.beam_width,
                         "new_item_share": new_item_share,
                         "checkpoint": str(checkpoint), "seconds": round(result.seconds, 1)})
    return Evaluation(result=result, split=split, beam_width=beam.beam_width, checkpoint=checkpoint)


# --- train-reward -----------------------------------------------------------------------------------------


def train_reward(run: RunDir, preset: str = "small", epochs: int | None = None, seed: int | None = None,
                 device: str | None = None, reuse: bool = False, progress: bool = False) -> Completed:
    """Train the reward model (swt, vtr, wtr, ltr towers) on logged sessions built from the run's interactions;
    writes RUN/reward/ then, last, the marker RUN/reward.json. `reward_summary(marker)` is its JSON summary:
    validation BCE and AUC per target of the kept epoch, the same AUC on the validation windows without skipped
    impressions (`val_auc_rated`: how well it ranks what users actually rated, apart from telling shown items
    from skipped ones), session counts and seconds."""
    import time

    from onerec.device import resolve_device
    from onerec.reward.labels import LABEL_MAPPING, TARGETS
    from onerec.reward.model import get_reward_config, save_reward_model
    from onerec.reward.train import STAGE, build_reward_data, check_config, reward_config_for, reward_dir
    from onerec.reward.train import evaluate as evaluate_reward
    from onerec.reward.train import train_reward as train_reward_model
    from onerec.tokenizer.catalog import Catalog

    run.require("tokenize")
    if run.is_complete(STAGE) and reuse:
        return _reused(run, STAGE, run.marker(STAGE), command="train-reward")
    cfg = _override(get_reward_config(preset), epochs=epochs, seed=seed, device=device)
    if device is not None:
        resolve_device(device)  # a bad --device fails before any work
    check_config(cfg)
    started = time.time()
    catalog = Catalog.load(run.catalog)
    data = from_dict(DataConfig, run.read_marker("prepare")["data"])
    cfg = reward_config_for(cfg, catalog, data)
    train_data, val_data = build_reward_data(run, catalog, cfg, data)
    run.marker(STAGE).unlink(missing_ok=True)  # from here the old reward model is being replaced
    result = train_reward_model(cfg, train_data, val_data, progress=progress)
    rated_val = build_reward_data(run, catalog, dataclasses.replace(cfg, copies=1), data, skip_prob=0.0)[1]
    rated = evaluate_reward(result.model, rated_val, cfg.batch_size * 2, next(result.model.parameters()).device)
    with staging_dir(reward_dir(run)) as tmp:
        save_reward_model(result.model, tmp)
    summary = {
        "val_bce": result.best["bce"], "val_auc": result.best.get("auc", {}), "val_auc_rated": rated["auc"],
        "best_epoch": result.best_epoch, "sessions": {"train": len(train_data), "val": len(val_data)},
        "seconds": round(time.time() - started, 1),
    }
    marker = {**summary, "preset": preset, "reward": to_dict(cfg), "targets": list(TARGETS),
              "label_mapping": LABEL_MAPPING, "history": result.history, "catalog_hash": catalog.content_hash}
    run.complete(STAGE, marker)
    return Completed(marker)


def reward_summary(marker: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary `onerec train-reward` prints, from its marker (`REWARD_SUMMARY`, in that order)."""
    return {key: marker[key] for key in REWARD_SUMMARY}


# --- align ------------------------------------------------------------------------------------------------


def align(run: RunDir, cfg: AlignConfig, device: str = "auto", out: Path | None = None, progress: bool = False,
          on_iteration: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Iterative Preference Alignment (paper Algorithm 2) from RUN/model with the run's reward model; iteration t
    is saved to OUT/iter_t/ (default OUT = RUN/align) and recorded in OUT/align.json as it finishes, then handed
    to `on_iteration`. Returns the records: each iteration's result and its checkpoint directory."""
    from onerec.align.ipa import align as run_align
    from onerec.data.sessions import Sessions
    from onerec.data.sid import SidSessions
    from onerec.device import resolve_device
    from onerec.model.onerec import load_model
    from onerec.reward.train import load_reward, session_scorer
    from onerec.tokenizer.catalog import Catalog

    run.require("train")
    cfg.check()
    dev = resolve_device(device)
    catalog = Catalog.load(run.catalog)
    model = load_model(run.model, device=str(dev))
    scorer = session_scorer(load_reward(run.root, device=dev))
    train_data = SidSessions.from_sessions(Sessions.load(run.sessions("train")), catalog, model.cfg.history_len)
    out = out or run.root / "align"
    history: list[dict[str, Any]] = []

    def record(result: IterationResult, directory: Path) -> None:
        history.append({**result.as_json(), "checkpoint": str(directory)})
        save_json(out / "align.json", {"config": dataclasses.asdict(cfg), "iterations": history})
        if on_iteration is not None:
            on_iteration(history[-1])

    run_align(model, catalog, train_data, scorer, cfg, out, dev, progress=progress, on_iteration=record)
    return history


# --- baselines --------------------------------------------------------------------------------------------


def baselines(run: RunDir, split: str = "test", only: list[str] | None = None, limit: int | None = None,
              device: str = "auto", sasrec_epochs: int | None = None, sasrec_seed: int | None = None,
              progress: bool = False) -> dict[str, dict]:
    """Most popular, item-kNN, EASE and SASRec+ trained on the run's training positives and scored on the held-out
    `split` exactly as `evaluate` scores the model (same users, history excluded, full catalogue, same metric code):
    {"popular": {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "seconds"}, ...}. SASRec stops early on the
    validation split. Writes RUN/baselines.json; needs only `prepare`. `only` picks some of the four; `sasrec_seed`
    replaces SASRec's seed (initialisation, batches, dropout) to measure its run-to-run spread."""
    from onerec.baselines.protocol import held_out, train_matrix
    from onerec.baselines.sasrec import SASRecConfig
    from onerec.baselines.suite import BaselinesConfig, check_names, run_baselines
    from onerec.data.interactions import Interactions
    from onerec.data.sessions import Sessions
    from onerec.device import resolve_device

    run.require("prepare")
    if split not in ("test", "val"):
        raise UsageError(f"--split: must be test or val, got {split!r}")
    try:
        names = check_names(only)
    except ValueError as exc:
        raise UsageError(f"--only: {exc}") from None
    if sasrec_epochs is not None and sasrec_epochs < 1:
        raise UsageError(f"--sasrec-epochs: must be >= 1, got {sasrec_epochs}")
    dev = resolve_device(device)
    sasrec_cfg = _override(SASRecConfig(device=str(dev)), max_epochs=sasrec_epochs, seed=sasrec_seed)
    data = train_matrix(Interactions.load(run.interactions), Interactions.load(run.train_interactions))
    try:
        users = held_out(Sessions.load(run.sessions(split)), data, limit=limit)
        val = held_out(Sessions.load(run.sessions("val")), data)
    except ValueError as exc:
        raise UsageError(f"--run: {run.root}: {exc}") from None
    results = run_baselines(data, users, val, BaselinesConfig(sasrec=sasrec_cfg), only=names, progress=progress)
    save_json(run.root / "baselines.json", {"split": split, "users": len(users), **results})
    return results
