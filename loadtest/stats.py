"""Exact statistics over every request of a run: per step (warm-up excluded), per endpoint, the low-load p50 and
the highest QPS whose p99 stays under 2x that p50. Percentiles are nearest-rank over the recorded latencies."""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.steps import Step, boundaries

PERCENTILES = (50, 95, 99)
SLO_ENDPOINT = "/recommend"  # whose latencies the max-QPS criterion reads: /events is a cheap write beside it
SERVED_FALLBACKS = ("cold_start",)  # popular answers that are the right answer, not shed load
RECORD_FIELDS = ("start_s", "step", "name", "latency_ms", "ok", "fallback", "model_version")


@dataclass(frozen=True)
class Record:
    """One finished request: started `start_s` seconds into the test, during step `step` (-1: outside the
    schedule), `ok` False for a failure, `fallback` the reason a /recommend answer came from popular items,
    `model_version` the version a /recommend answer names (empty for /events and failures)."""

    start_s: float
    step: int
    name: str
    latency_ms: float
    ok: bool
    fallback: str = ""
    model_version: str = ""


def write_records(path: Path, records: Iterable[Record]) -> None:
    """One CSV row per request (`records.csv`), for the plot and for re-computing the statistics."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(RECORD_FIELDS)
        for r in records:
            writer.writerow((f"{r.start_s:.6f}", r.step, r.name, f"{r.latency_ms:.3f}", int(r.ok), r.fallback,
                             r.model_version))


def read_records(path: Path) -> list[Record]:
    with path.open(newline="") as fh:
        return [Record(float(row["start_s"]), int(row["step"]), row["name"], float(row["latency_ms"]),
                       row["ok"] == "1", row["fallback"], row.get("model_version") or "")
                for row in csv.DictReader(fh)]  # files written before model_version have no such column


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile: the ceil(q/100 * n)-th smallest value (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def group_stats(records: Sequence[Record], seconds: float) -> dict[str, Any]:
    """requests, failures, qps (requests / `seconds`) and p50/p95/p99 (ms, over all requests, failed included,
    as locust does) of `records`."""
    latencies = [r.latency_ms for r in records]
    stats: dict[str, Any] = {"requests": len(records), "failures": sum(not r.ok for r in records),
                             "qps": len(records) / seconds if seconds > 0 else 0.0}
    for q in PERCENTILES:
        value = percentile(latencies, q)
        stats[f"p{q}_ms"] = None if value is None else round(value, 3)
    stats["qps"] = round(stats["qps"], 3)
    return stats


def by_endpoint(records: Sequence[Record], seconds: float) -> dict[str, dict[str, Any]]:
    names = sorted({r.name for r in records})
    return {name: group_stats([r for r in records if r.name == name], seconds) for name in names}


def fallback_counts(records: Iterable[Record]) -> dict[str, int]:
    """Popular (fallback) answers by reason."""
    return dict(sorted(Counter(r.fallback for r in records if r.fallback).items()))


def step_stats(records: Sequence[Record], steps: Sequence[Step], warmup_s: float) -> list[dict[str, Any]]:
    """Per step: the statistics of the requests started in [step start + warm-up, step end) (the first `warmup_s`
    seconds of every step are left out: users still starting, queues filling), plus what the warm-up held."""
    edges = boundaries(steps)
    result = []
    for index, step in enumerate(steps):
        start, end = edges[index], edges[index + 1]
        skip = min(warmup_s, step.duration_s / 2)  # never more than half a step
        mine = [r for r in records if r.step == index]
        measured = [r for r in mine if r.start_s >= start + skip]
        warm = [r for r in mine if r.start_s < start + skip]
        entry = {"step": index, "users": step.users, "spawn_rate": step.spawn_rate, "start_s": start, "end_s": end,
                 "warmup_s": skip, "measured_s": end - start - skip}
        entry.update(group_stats(measured, end - start - skip))
        entry.update({"warmup_requests": len(warm), "warmup_failures": sum(not r.ok for r in warm),
                      "endpoints": by_endpoint(measured, end - start - skip),
                      "fallbacks": fallback_counts(mine)})
        result.append(entry)
    return result


def slo_stats(step: dict[str, Any], endpoint: str | None) -> dict[str, Any]:
    """The numbers the latency criterion reads in a step: one endpoint's, or the step's over all requests (None)."""
    if endpoint is None:
        return step
    return step["endpoints"].get(endpoint) or {"requests": 0, "qps": 0.0, "p50_ms": None, "p99_ms": None}


def low_load_p50(steps: Sequence[dict[str, Any]], endpoint: str | None = None) -> float | None:
    """The p50 (of `endpoint`, or of all requests) of the step with the fewest users (the first such step) that
    measured any such request."""
    candidates = [s for s in steps if slo_stats(s, endpoint)["requests"] > 0]
    if not candidates:
        return None
    return slo_stats(min(candidates, key=lambda s: (s["users"], s["step"])), endpoint)["p50_ms"]


def max_qps_under(steps: Sequence[dict[str, Any]], low_p50_ms: float | None, factor: float = 2.0,
                  endpoint: str | None = None) -> dict[str, Any] | None:
    """The step with the highest QPS (all requests) among those whose p99 (of `endpoint`, or of all requests) is
    under `factor` x the low-load p50, that failed no request and that the model served: a popular answer for any
    reason but cold start (Triton timeout, circuit open, ...) means the gateway shed load, so its fast answers
    do not count as capacity. Warm-up included; None when no step qualifies."""
    if low_p50_ms is None:
        return None
    limit = factor * low_p50_ms

    def qualifies(step: dict[str, Any]) -> bool:
        stats = slo_stats(step, endpoint)
        clean = step["failures"] + step.get("warmup_failures", 0) == 0
        degraded = sum(n for reason, n in step.get("fallbacks", {}).items() if reason not in SERVED_FALLBACKS)
        return (stats["requests"] > 0 and clean and not degraded and stats["p99_ms"] is not None
                and stats["p99_ms"] < limit)

    qualifying = [s for s in steps if qualifies(s)]
    if not qualifying:
        return None
    best = max(qualifying, key=lambda s: (s["qps"], -s["step"]))
    stats = slo_stats(best, endpoint)
    return {"qps": best["qps"], "users": best["users"], "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
            "step": best["step"], "p99_limit_ms": round(limit, 3), "endpoint": endpoint or "total",
            "endpoint_qps": stats["qps"]}


def run_stats(records: Sequence[Record], steps: Sequence[Step], warmup_s: float, duration_s: float,
              slo_endpoint: str | None = SLO_ENDPOINT) -> dict[str, Any]:
    """Everything the summary computes from the records: total and per endpoint over the whole run (warm-ups
    included, QPS over `duration_s`), the steps, the low-load p50 and the max-QPS selection (latencies of
    `slo_endpoint`, None: of all requests), and the fallbacks."""
    step_list = step_stats(records, steps, warmup_s)
    low = low_load_p50(step_list, slo_endpoint)
    recommends = sum(r.name == "/recommend" for r in records)
    fallbacks = fallback_counts(records)
    return {
        "total": group_stats(records, duration_s),
        "endpoints": by_endpoint(records, duration_s),
        "steps": step_list,
        "low_load_p50_ms": low,
        "max_qps_p99_under_2x_low_p50": max_qps_under(step_list, low, endpoint=slo_endpoint),
        "slo_endpoint": slo_endpoint or "total",
        "fallbacks": {"total": sum(fallbacks.values()), "by_reason": fallbacks,
                      "share_of_recommend": round(sum(fallbacks.values()) / recommends, 4) if recommends else 0.0},
        "warmup_s": warmup_s,
        "duration_s": round(duration_s, 3),
    }
