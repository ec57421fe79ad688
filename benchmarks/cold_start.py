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
  4. the held-out items added afterwards, twice from the same trained run: with `catalog add` (genres from
     u.item -> ridge map to the collaborative embedding -> residual nearest centroid per level + a free last code)
     and with random insertion (a uniformly random free SID each); plus the catalog without them;
  5. on the test users: how often held-out items are recommended (share of the served top-5 slots, users with one,
     distinct held-out items shown), their Recall@5/@10 on the users whose test target holds one (hits among the
     held-out target items / held-out target items), and the ordinary Recall@5 on all users.
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
    p.add_argument("--until", choices=("train", "all"), default="all", help="stop after training (default all)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--progress", action="store_true", help="progress bars (default: only on a terminal)")
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


def served_lists(model: Any, catalog: Any, sessions: Sessions, beam: Any, top: int, limit: int | None,
                 progress: bool) -> tuple[list[int], list[list[int]]]:
    """The served answer's top `top` videos per test user, exactly as `onerec evaluate` builds it (history excluded,
    beam search's best next items, then backfill); returns the session rows scored and their lists."""
    from tqdm import tqdm

    from onerec.model.generate import generate
    from onerec.recommend import sessions_to_videos

    rows = [i for i in range(len(sessions)) if (catalog.rows_of(sessions.history_of(i)) >= 0).any()]
    rows = rows[:limit] if limit else rows
    lists: list[list[int]] = []
    for start in tqdm(range(0, len(rows), 16), desc="score", unit="batch", disable=not progress):
        chunk = rows[start:start + 16]
        videos = [sessions.history_of(i) for i in chunk]
        histories = [catalog.known_sids(h) for h in videos]
        exclude = [catalog.leaves_of(h) for h in videos]
        result = generate(model, catalog.trie, histories, beam, exclude=[e[e >= 0] for e in exclude],
                          session_len=beam.session_len or None)
        for hist, leaves in zip(videos, result.leaves.cpu().numpy(), strict=True):
            lists.append(sessions_to_videos(catalog, leaves, exclude=hist.tolist(), k=top).video_ids)
    return rows, lists


def cold_metrics(rows: list[int], lists: list[list[int]], sessions: Sessions, items: np.ndarray) -> dict[str, Any]:
    """How often the held-out `items` are served and how well, next to the ordinary metrics on every user."""
    from onerec.eval import score_recommendations

    new = set(items.tolist())
    targets = [[int(v) for v in sessions.targets[r] if v >= 0] for r in rows]
    recall5, ndcg5 = score_recommendations(lists, targets, 5)
    recall10, _ = score_recommendations(lists, targets, 10)
    top5 = [lst[:5] for lst in lists]
    shown = [v for lst in top5 for v in lst if v in new]
    cold_users = [u for u, t in enumerate(targets) if new & set(t)]
    def new_recall(u: int, k: int) -> float:
        wanted = new & set(targets[u])
        return len(wanted & set(lists[u][:k])) / len(wanted)
    recall_cold5, _ = score_recommendations([lists[u] for u in cold_users], [targets[u] for u in cold_users], 5)
    return {
        "users": len(rows),
        "recall@5": recall5, "ndcg@5": ndcg5, "recall@10": recall10,
        "new_share_of_top5": len(shown) / max(1, sum(len(lst) for lst in top5)),
        "users_shown_a_new_item": sum(any(v in new for v in lst) for lst in top5) / max(1, len(rows)),
        "distinct_new_items_shown": len(set(shown)),
        "cold_users": len(cold_users),
        "new_recall@5": float(np.mean([new_recall(u, 5) for u in cold_users])) if cold_users else 0.0,
        "new_recall@10": float(np.mean([new_recall(u, 10) for u in cold_users])) if cold_users else 0.0,
        "cold_users_recall@5": recall_cold5,
    }


def score(run_model: RunDir, catalog_dir: Path, test: Sessions, items: np.ndarray, args: argparse.Namespace,
          beam: Any) -> dict[str, Any]:
    import torch

    from onerec.model.onerec import load_model
    from onerec.tokenizer.catalog import Catalog

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(run_model.model)
    model.eval()
    catalog = Catalog.load(catalog_dir)
    start = time.perf_counter()
    rows, lists = served_lists(model, catalog, test, beam, 10, args.limit, args.progress)
    return {**cold_metrics(rows, lists, test, items), "catalog": catalog.content_hash,
            "catalog_items": catalog.num_items, "seconds": round(time.perf_counter() - start, 1)}


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
    placements = [("catalog add", "codebook", args.seed)] + [
        (f"random insertion (seed {s})", "random", s) for s in range(args.seed, args.seed + args.random_seeds)]
    added: dict[str, Any] = {}
    for name, placement, seed in placements:
        copy = catalog_copy(cold, args.out / f"add-{placement}-{seed}")
        begin = time.perf_counter()
        report = add_items(copy, args.data / "u.item", AddConfig(placement=placement, seed=seed))
        added[name] = {**{k: v for k, v in report.as_json().items() if k not in ("video_ids", "sids")},
                       "command_seconds": round(time.perf_counter() - begin, 3)}
        conditions[name] = score(cold, copy.catalog, test, items, args, beam)
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
    """The Markdown table of the conditions."""
    head = ("| condition | new share of top-5 | users shown a new item | new items shown | new Recall@5 | "
            "new Recall@10 | cold users' Recall@5 | all users' Recall@5 | NDCG@5 |\n|---|---:|---:|---:|---:|---:|"
            "---:|---:|---:|")
    lines = [head]
    for name, m in result["conditions"].items():
        lines.append(f"| {name} | {m['new_share_of_top5']:.4f} | {m['users_shown_a_new_item']:.4f} | "
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
