"""Tokenizer at scale: balanced residual k-means on 1M synthetic items, plus Algorithm 1 vs vectorised side by side.

    .venv/bin/python benchmarks/tokenizer_scale.py --json runs/tokenizer_scale.json

Part 1 tokenizes --items x --dim clustered float32 vectors with K=--codes, L=--levels on the CPU and reports wall
time, cluster sizes, reconstruction error and collisions per level. Part 2 (the peer) runs the literal sequential
OneRec Algorithm 1 and the vectorised implementation on the first --peer-items items, same K, seed, init and
iterations, and prints the time ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onerec.config import TokenizerConfig
from onerec.tokenizer.kmeans import balanced_kmeans, balanced_kmeans_sequential
from onerec.tokenizer.residual import residual_quantize

GOAL_SECONDS = 300.0  # the target: 1M items, K=8192, L=3 in under 5 minutes on 2 CPU cores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="N synthetic items (default 1,000,000)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension d (default 64)")
    p.add_argument("--codes", type=int, default=8192, help="K codes per level (default 8192)")
    p.add_argument("--levels", type=int, default=3, help="L levels (default 3)")
    p.add_argument("--iters", type=int, default=10, help="Lloyd iterations per level (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-items", type=int, default=50_000, help="items in the side-by-side run (default 50,000)")
    p.add_argument("--peer-codes", type=int, default=512, help="K in the side-by-side run (default 512)")
    p.add_argument("--peer-iters", type=int, default=10, help="iterations in the side-by-side run (default 10)")
    p.add_argument("--skip-peer", action="store_true", help="only run the full-scale tokenization")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def synthetic_items(n: int, d: int, seed: int) -> np.ndarray:
    """(N, d) float32 clustered vectors: a two-level Gaussian mixture with Zipf-like topic sizes.

    256 topics (spread 1.0) x 32 sub-topics each (spread 0.35) + item noise (0.15), so that coarse and fine
    structure both exist, like collaborative item embeddings."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((256, d), dtype=np.float32)
    subtopics = topics[:, None, :] + 0.35 * rng.standard_normal((256, 32, d), dtype=np.float32)
    weights = 1.0 / np.arange(1, 256 * 32 + 1) ** 0.6
    which = rng.choice(256 * 32, size=n, p=weights / weights.sum())
    x = subtopics.reshape(-1, d)[which]
    x += 0.15 * rng.standard_normal((n, d), dtype=np.float32)
    return x


def is_balanced(sizes_min: int, sizes_max: int, n: int, k: int) -> bool:
    return sizes_min == n // k and sizes_max == -(-n // k)


def run_scale(args: argparse.Namespace, x: np.ndarray) -> dict[str, Any]:
    """Part 1: the full residual quantizer on all items."""
    cfg = TokenizerConfig(
        levels=args.levels, codes=args.codes, iters=args.iters, embedding_dim=args.dim, seed=args.seed, device="cpu"
    )
    start = time.perf_counter()
    result = residual_quantize(x, cfg)
    total = time.perf_counter() - start
    report = result.report
    n, k = x.shape[0], args.codes
    balanced = all(is_balanced(lv["min_cluster"], lv["max_cluster"], n, k) for lv in report["levels"])
    return {"seconds": round(total, 1), "balanced": balanced, "meets_goal": total < GOAL_SECONDS and balanced,
            "report": report}


def timed_kmeans(fn, x: torch.Tensor, k: int, iters: int, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    centroids, assign = fn(x, k, iters=iters, seed=seed)
    seconds = time.perf_counter() - start
    counts = torch.bincount(assign, minlength=k)
    return {
        "seconds": round(seconds, 2),
        "mse": round(float(((x - centroids[assign]) ** 2).sum(1).mean()), 4),
        "min_cluster": int(counts.min()),
        "max_cluster": int(counts.max()),
        "balanced": is_balanced(int(counts.min()), int(counts.max()), x.shape[0], k),
    }


def run_peer(args: argparse.Namespace, x: np.ndarray) -> dict[str, Any]:
    """Part 2: literal Algorithm 1 (one cluster at a time) vs vectorised, one level, same init."""
    sub = torch.from_numpy(x[: args.peer_items].copy())
    seq = timed_kmeans(balanced_kmeans_sequential, sub, args.peer_codes, args.peer_iters, args.seed)
    vec = timed_kmeans(balanced_kmeans, sub, args.peer_codes, args.peer_iters, args.seed)
    return {
        "items": int(sub.shape[0]), "codes": args.peer_codes, "iters": args.peer_iters,
        "sequential": seq, "vectorised": vec, "speedup": round(seq["seconds"] / max(vec["seconds"], 1e-9), 1),
    }


def machine() -> dict[str, Any]:
    return {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def print_scale(res: dict[str, Any], n: int, k: int) -> None:
    rep = res["report"]
    print(f"\n== residual quantizer: N={n:,} K={k} L={len(rep['levels'])} (input mse {rep['input_mse']:.4f})")
    print(f"{'level':>5} {'seconds':>8} {'min':>5} {'max':>5} {'used':>6} {'recon mse':>10}")
    for lv in rep["levels"]:
        print(f"{lv['level']:>5} {lv['seconds']:>8.1f} {lv['min_cluster']:>5} {lv['max_cluster']:>5} "
              f"{lv['utilisation']:>6.3f} {lv['reconstruction_mse']:>10.4f}")
    print(f"total {res['seconds']:.1f} s; balanced: {res['balanced']}; unique SIDs {rep['num_unique_sids']:,}; "
          f"collision rate {rep['collision_rate']:.4f}; goal < {GOAL_SECONDS:.0f} s met: {res['meets_goal']}")


def print_peer(res: dict[str, Any]) -> None:
    print(f"\n== peer: N={res['items']:,} K={res['codes']} one level, {res['iters']} iterations, same init")
    print(f"{'impl':>11} {'seconds':>8} {'mse':>8} {'min':>5} {'max':>5} {'balanced':>8}")
    for name in ("sequential", "vectorised"):
        r = res[name]
        print(f"{name:>11} {r['seconds']:>8.2f} {r['mse']:>8.4f} {r['min_cluster']:>5} {r['max_cluster']:>5} "
              f"{r['balanced']!s:>8}")
    print(f"sequential / vectorised time ratio: {res['speedup']}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
            "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    print(json.dumps(info))
    start = time.perf_counter()
    x = synthetic_items(args.items, args.dim, args.seed)
    info["data_seconds"] = round(time.perf_counter() - start, 1)
    scale = run_scale(args, x)
    print_scale(scale, args.items, args.codes)
    results: dict[str, Any] = {**info, "args": {k: str(v) for k, v in vars(args).items()}, "scale": scale}
    if not args.skip_peer:
        results["peer"] = run_peer(args, x)
        print_peer(results["peer"])
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
