"""Cold-start study (TIGER's): hold out 10% of the items from training, add them with `catalog add`, measure them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cold_start.py --data ../shared/data/ml-100k \\
        --out runs/coldstart --json runs/coldstart/result.json

Steps, each reused when its output exists (a run directory's stage markers):
  1. `onerec prepare` of the whole dataset into OUT/full (the usual time split, the usual test users);
  2. OUT/cold: the same run with a seeded --fraction of the items and every interaction with them removed from
     what training sees (all interactions, the embeddings' positives, train and validation sessions: those items
     are dropped from histories and targets, a target left empty drops its session). The test sessions are kept
     whole, so the test users who later watched a held-out item are the ones the study scores;
  3. `onerec tokenize` + `onerec train` on OUT/cold (the held-out items are in no catalog, no SID, no gradient);
  4. the held-out items added afterwards to copies of the trained run's catalog: with `catalog add` (genres and
     year from u.item -> ridge map to the collaborative embedding -> residual nearest centroid per level, known
     prefixes first, + a free last code), the same with `--any-prefix`, with random insertion (a uniformly
     random free SID each, --random-seeds seeds) and with a random free SID under a random known (L-1)-prefix (the
     same seeds); plus the catalog without them;
  5. on the test users, from one beam search each (beam and ranked next items as served): how often held-out items
     are recommended (share of the top-5 slots, users shown one, distinct held-out items shown), their Recall@5/@10
     on the users whose test target holds one (hits among the held-out target items / held-out target items), and
     the ordinary Recall@5 on all users; under two mappings of the generated SIDs to videos: `served` (the gateway's
     and `onerec evaluate`'s) and TIGER's cold-start retrieval (`prefix match S`: the new items sharing a generated
     SID's first L-1 codes follow it, at most ceil(S * k) of them in the top k). One more row reads the histories
     without the new items (the model was never trained on their SIDs) over the `catalog add` catalog.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from onerec.data.interactions import Interactions
from onerec.data.sessions import Sessions
from onerec.runs import RunDir

log = logging.getLogger("cold_start")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/ml-100k"),
                   help="MovieLens directory with u.data and u.item (default ../shared/data/ml-100k)")
    p.add_argument("--out", type=Path, default=Path("runs/coldstart"), help="where OUT/full and OUT/cold go")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the items held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="which items are held out, and the random insertion")
    p.add_argument("--preset", default=None, help="training preset (default: the one prepare chose, small)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--beam-width", type=int, default=None, help="beam width (default: the preset's)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N test users")
    p.add_argument("--random-seeds", type=int, default=3, help="random insertions scored, seeds SEED.. (default 3)")
    p.add_argument("--reference", type=Path, default=None,
                   help="a run trained on every item of the same data (e.g. runs/default/ml-100k), scored alike")
    p.add_argument("--prefix-share", type=float, nargs="*", default=[0.2],
                   help="also score TIGER's prefix match with at most this share of new items in the top k")
    p.add_argument("--until", choices=("train", "all"), default="all", help="stop after training (default all)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--progress", action="store_true", default=sys.stderr.isatty(),
                   help="progress bars (default: only on a terminal)")
    return p.parse_args(argv)


# --- hold-out ---------------------------------------------------------------------------------------------


def held_out_items(video_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded random `fraction` of `video_ids` (at least one), ascending."""
    if not 0.0 < fraction < 1.0:
        raise SystemExit(f"--fraction: must lie in (0, 1), got {fraction}")
    count = max(1, int(round(fraction * len(video_ids))))
    pick = np.random.default_rng(seed).choice(len(video_ids), size=count, replace=False)
    return np.sort(np.asarray(video_ids, dtype=np.int64)[pick])


def without_items(sessions: Sessions, items: np.ndarray) -> Sessions:
    """`sessions` with `items` dropped from every history and target (targets compacted, -1 padded at the end);
    a session whose target is left empty is dropped."""
    keep_hist = ~np.isin(sessions.history, items)
    targets = np.where(np.isin(sessions.targets, items), -1, sessions.targets)  # (S, m)
    order = np.argsort(targets < 0, axis=1, kind="stable")  # real items first, in their order
    targets = np.take_along_axis(targets, order, axis=1)
    alive = targets[:, 0] >= 0
    lengths = np.add.reduceat(keep_hist.astype(np.int64), sessions.history_offsets[:-1]) \
        if len(sessions.history) else np.zeros(len(sessions), dtype=np.int64)
    lengths = np.where(np.diff(sessions.history_offsets) == 0, 0, lengths)  # reduceat repeats on empty ranges
    session_of = np.repeat(np.arange(len(sessions)), np.diff(sessions.history_offsets))
    history = sessions.history[keep_hist & alive[session_of]]
    offsets = np.concatenate([[0], np.cumsum(lengths[alive])]).astype(np.int64)
    return Sessions(users=sessions.users[alive], history=history, history_offsets=offsets, targets=targets[alive])


def make_cold_run(full: RunDir, cold: RunDir, fraction: float, seed: int) -> np.ndarray:
    """Write OUT/cold from OUT/full without the held-out items (see the module docstring); returns them."""
    if cold.is_complete("prepare"):
        return np.asarray(json.loads((cold.root / "held_out.json").read_text())["items"], dtype=np.int64)
    interactions = Interactions.load(full.interactions)
    items = held_out_items(np.unique(interactions.items), fraction, seed)
    shutil.rmtree(cold.root, ignore_errors=True)
    cold.data.mkdir(parents=True)
    interactions.select(~np.isin(interactions.items, items)).save(cold.interactions)
    train_inter = Interactions.load(full.train_interactions)
    train_inter.select(~np.isin(train_inter.items, items)).save(cold.train_interactions)
    for split in ("train", "val"):
        without_items(Sessions.load(full.sessions(split)), items).save(cold.sessions(split))
    shutil.copy2(full.sessions("test"), cold.sessions("test"))
    (cold.root / "held_out.json").write_text(json.dumps({"fraction": fraction, "seed": seed,
                                                         "items": items.tolist()}) + "\n")
    marker = full.read_marker("prepare")
    marker = {k: v for k, v in marker.items() if k not in ("stage", "finished_at")}
    cold.complete("prepare", {**marker, "held_out": {"items": len(items), "fraction": fraction, "seed": seed,
                                                     "from": str(full.root)}})
    log.info("cold run %s: %d of %d items held out", cold.root, len(items), len(np.unique(interactions.items)))
    return items


def prepare_and_train(args: argparse.Namespace) -> tuple[RunDir, RunDir, np.ndarray, dict[str, float]]:
    """Steps 1-3; returns the runs, the held-out items and each step's wall seconds."""
    from onerec import stages
    from onerec.data.sources import SourceOptions

    full, cold = RunDir(args.out / "full"), RunDir(args.out / "cold")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    stages.prepare(full, "movielens", SourceOptions(path=args.data), preset=args.preset, reuse=True)
    items = make_cold_run(full, cold, args.fraction, args.seed)
    seconds["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    stages.tokenize(cold, args.preset, reuse=True)
    seconds["tokenize"] = time.perf_counter() - start
    start = time.perf_counter()
    stages.train(cold, args.preset, epochs=args.epochs, reuse=True, progress=args.progress)
    seconds["train"] = time.perf_counter() - start
    return full, cold, items, seconds


# --- adding and scoring -----------------------------------------------------------------------------------


def catalog_copy(cold: RunDir, out: Path) -> RunDir:
    """A run directory holding what `catalog add` reads of the cold run (its catalog as trained, the embeddings,
    the markers), so each placement starts from the same catalog and the cold run stays as trained."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("prepare.json", "tokenize.json", "embeddings.npy"):
        shutil.copy2(cold.root / name, out / name)
    shutil.copytree(cold.catalog, out / "catalog")
    return RunDir(out)


def generated(model: Any, catalog: Any, sessions: Sessions, beam: Any, limit: int | None, progress: bool,
              history_catalog: Any = None) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Beam search's ranked next items (R leaves) per test user with a known history item, as `onerec evaluate`
    and the gateway run it (history excluded); returns the session rows, their leaves and their histories. With
    `history_catalog`, the model reads the histories through it (the new items left out of what it encodes)."""
    from tqdm import tqdm

    from onerec.model.generate import generate

    rows = [i for i in range(len(sessions)) if (catalog.rows_of(sessions.history_of(i)) >= 0).any()]
    rows = rows[:limit] if limit else rows
    leaves: list[np.ndarray] = []
    histories: list[np.ndarray] = []
    for start in tqdm(range(0, len(rows), 16), desc="score", unit="batch", disable=not progress):
        chunk = rows[start:start + 16]
        videos = [sessions.history_of(i) for i in chunk]
        exclude = [catalog.leaves_of(h) for h in videos]
        result = generate(model, catalog.trie, [(history_catalog or catalog).known_sids(h) for h in videos], beam,
                          exclude=[e[e >= 0] for e in exclude], session_len=beam.session_len or None)
        leaves += list(result.leaves.cpu().numpy().reshape(len(chunk), -1))
        histories += videos
    return rows, leaves, histories


def served(catalog: Any, leaves: np.ndarray, history: np.ndarray, k: int, share: float = 0.0) -> list[int]:
    """The gateway's mapping (`onerec.recommend.sessions_to_videos`): each generated leaf's first unseen video; with
    `share` > 0 TIGER's prefix match as the gateway serves it (ONEREC_NEW_ITEM_SHARE): after each leaf's video the
    catalog's new items (popularity 0) whose first L-1 codes equal the leaf's, at most ceil(share * k) of them."""
    from onerec.recommend import sessions_to_videos

    return sessions_to_videos(catalog, leaves.reshape(-1, 1), exclude=history.tolist(), k=k, new_share=share).video_ids


def cold_metrics(rows: list[int], lists5: list[list[int]], lists10: list[list[int]], sessions: Sessions,
                 items: np.ndarray) -> dict[str, Any]:
    """How often the held-out `items` are served and how well, next to the ordinary metrics on every user."""
    from onerec.eval import score_recommendations

    new = set(items.tolist())
    targets = [[int(v) for v in sessions.targets[r] if v >= 0] for r in rows]
    recall5, ndcg5 = score_recommendations(lists5, targets, 5)
    recall10, _ = score_recommendations(lists10, targets, 10)
    shown = [v for lst in lists5 for v in lst[:5] if v in new]
    cold_users = [u for u, t in enumerate(targets) if new & set(t)]

    def new_recall(lists: list[list[int]], u: int, k: int) -> float:
        wanted = new & set(targets[u])
        return len(wanted & set(lists[u][:k])) / len(wanted)

    recall_cold5, _ = score_recommendations([lists5[u] for u in cold_users], [targets[u] for u in cold_users], 5)
    return {
        "users": len(rows),
        "recall@5": recall5, "ndcg@5": ndcg5, "recall@10": recall10,
        "new_share_of_top5": len(shown) / max(1, 5 * len(rows)),
        "users_shown_a_new_item": sum(any(v in new for v in lst[:5]) for lst in lists5) / max(1, len(rows)),
        "distinct_new_items_shown": len(set(shown)),
        "cold_users": len(cold_users),
        "new_recall@5": float(np.mean([new_recall(lists5, u, 5) for u in cold_users])) if cold_users else 0.0,
        "new_recall@10": float(np.mean([new_recall(lists10, u, 10) for u in cold_users])) if cold_users else 0.0,
        "cold_users_recall@5": recall_cold5,
    }


def score(run_model: RunDir, catalog_dir: Path, test: Sessions, items: np.ndarray, args: argparse.Namespace,
          beam: Any, history_catalog_dir: Path | None = None) -> dict[str, Any]:
    """Both mappings of one beam search per user: as served today, and with TIGER's prefix match."""
    from onerec.model.onerec import load_model
    from onerec.tokenizer.catalog import Catalog

    model = load_model(run_model.model)
    model.eval()
    catalog = Catalog.load(catalog_dir)
    start = time.perf_counter()
    history_catalog = Catalog.load(history_catalog_dir) if history_catalog_dir is not None else None
    rows, leaves, histories = generated(model, catalog, test, beam, args.limit, args.progress, history_catalog)
    out = {"catalog": catalog.content_hash, "catalog_items": catalog.num_items}
    lists10 = [served(catalog, lv, h, 10) for lv, h in zip(leaves, histories, strict=True)]
    out["served"] = cold_metrics(rows, [lst[:5] for lst in lists10], lists10, test, items)
    for share in args.prefix_share:
        lists = {k: [served(catalog, lv, h, k, share) for lv, h in zip(leaves, histories, strict=True)]
                 for k in (5, 10)}
        out[f"prefix match {share:g}"] = cold_metrics(rows, lists[5], lists[10], test, items)
    return {**out, "seconds": round(time.perf_counter() - start, 1)}


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from onerec.config import get_preset
    from onerec.tokenizer.additions import AddConfig, add_items

    full, cold, items, seconds = prepare_and_train(args)
    result: dict[str, Any] = {"machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} "
                              f"cores, torch threads {_threads()}".strip(),
                              "held_out_items": len(items), "fraction": args.fraction, "seed": args.seed,
                              "train": {k: cold.read_marker("train")[k] for k in ("best_epoch", "seconds")}}
    if args.until == "train":
        return {**result, "seconds": seconds}
    beam = get_preset(cold.read_marker("train")["preset"]).beam
    if args.beam_width:
        beam = dataclasses.replace(beam, beam_width=args.beam_width)
    test = Sessions.load(cold.sessions("test"))
    conditions: dict[str, Any] = {}
    start = time.perf_counter()
    conditions["not added"] = score(cold, cold.catalog, test, items, args, beam)
    placements = [("catalog add", "codebook", args.seed, True), ("catalog add --any-prefix", "codebook", args.seed,
                                                                  False)] + [
        (f"random insertion (seed {s})", "random", s, False) for s in range(args.seed, args.seed + args.random_seeds)
    ] + [(f"random under a known prefix (seed {s})", "random", s, True)
         for s in range(args.seed, args.seed + args.random_seeds)]
    added: dict[str, Any] = {}
    for name, placement, seed, known in placements:
        copy = catalog_copy(cold, args.out / f"add-{placement}-{seed}{'' if known else '-any'}")
        begin = time.perf_counter()
        report = add_items(copy, args.data / "u.item", AddConfig(placement=placement, seed=seed,
                                                                 known_prefixes=known))
        added[name] = {**{k: v for k, v in report.as_json().items() if k not in ("video_ids", "sids")},
                       "command_seconds": round(time.perf_counter() - begin, 3)}
        conditions[name] = score(cold, copy.catalog, test, items, args, beam)
        if name == "catalog add":  # the same catalog, the model reading histories without the new items
            conditions["catalog add, histories without new items"] = score(cold, copy.catalog, test, items, args,
                                                                           beam, history_catalog_dir=cold.catalog)
    if args.reference is not None:
        reference = RunDir(args.reference)
        same = np.array_equal(Sessions.load(reference.sessions("test")).targets, test.targets)
        conditions["reference: trained with every item"] = {
            **score(reference, reference.catalog, test, items, args, beam), "same_test_sessions": same}
    seconds["score"] = time.perf_counter() - start
    return {**result, "beam_width": beam.beam_width, "seconds": seconds, "catalog_add": added,
            "conditions": conditions}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def table(result: dict[str, Any]) -> str:
    """The Markdown table: one row per condition and mapping."""
    lines = ["| condition | mapping | new share of top-5 | users shown a new item | new items shown | new Recall@5 | "
             "new Recall@10 | cold users' Recall@5 | all users' Recall@5 | NDCG@5 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, condition in result["conditions"].items():
        for mapping, m in condition.items():
            if not isinstance(m, dict):
                continue
            lines.append(f"| {name} | {mapping} | {m['new_share_of_top5']:.4f} | {m['users_shown_a_new_item']:.4f} | "
                         f"{m['distinct_new_items_shown']} | {m['new_recall@5']:.4f} | {m['new_recall@10']:.4f} | "
                         f"{m['cold_users_recall@5']:.4f} | {m['recall@5']:.4f} | {m['ndcg@5']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    result = run_study(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if "conditions" in result:
        print(table(result), file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
