"""The run's report: `summary.json` and `summary.md` from steps.json and locust's CSV, and `latency.png`."""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.stats import Record, percentile

log = logging.getLogger(__name__)
ENDPOINTS = ("/recommend", "/events")
_CSV_COLUMNS = {"requests": "Request Count", "failures": "Failure Count", "rps": "Requests/s", "p50_ms": "50%",
                "p95_ms": "95%", "p99_ms": "99%"}


def read_locust_stats(path: Path) -> dict[str, dict[str, float | None]]:
    """locust's `*_stats.csv` by request name ("Aggregated" for the total): counts, requests/s, p50/p95/p99 ms
    (locust rounds its percentiles to its histogram buckets; the exact ones are in steps.json)."""
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        return {row["Name"]: {key: _number(row.get(column)) for key, column in _CSV_COLUMNS.items()}
                for row in csv.DictReader(fh)}


def _number(text: str | None) -> float | None:
    if text in (None, "", "N/A"):
        return None
    value = float(text)
    return int(value) if value.is_integer() else value


def build_summary(stats: dict[str, Any], locust_csv: dict[str, dict[str, float | None]], meta: dict[str, Any]
                  ) -> dict[str, Any]:
    """summary.json: the exact statistics of steps.json, locust's own totals beside them, and the run's settings.
    Fewer records than locust counted is logged as a warning (a request went unrecorded)."""
    summary = dict(stats)
    summary["locust_csv"] = locust_csv
    summary.update(meta)
    theirs, ours = (locust_csv.get("Aggregated") or {}).get("requests"), stats["total"]["requests"]
    if theirs is not None and theirs > ours:
        log.warning("locust_stats.csv counts %s requests but only %s were recorded", theirs, ours)
    elif theirs is not None and theirs < ours:  # its CSV is rewritten once a second: the last second can be missing
        log.info("locust_stats.csv (written once a second) counts %s requests, the records %s", theirs, ours)
    return summary


def write_summary_json(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(name: str, s: dict[str, Any]) -> str:
    return (f"| {name} | {s['requests']} | {s['qps']:.2f} | {_ms(s['p50_ms'])} | {_ms(s['p95_ms'])} | "
            f"{_ms(s['p99_ms'])} | {s['failures']} |")


def summary_markdown(summary: dict[str, Any]) -> str:
    """The short human summary: totals per endpoint, the steps, the max-QPS line, fallbacks and the warm-up rule."""
    lines = [f"# Load test {summary.get('started_at', '')}".rstrip(), "",
             f"Target `{summary.get('url', '?')}`, steps `{summary.get('schedule', '?')}` (users x seconds @ spawn "
             f"rate), {summary['duration_s']:.0f} s in all.", "",
             "## Whole run", "", "| endpoint | requests | QPS | p50 ms | p95 ms | p99 ms | failures |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(f"`{name}`", s) for name, s in summary["endpoints"].items()]
    lines += [_row("**total**", summary["total"]), "", "## Per step (warm-up excluded)", "", *_step_table(summary)]
    lines += ["", _selection_line(summary), "", _fallback_line(summary["fallbacks"]), "",
              f"Warm-up: the first {summary['warmup_s']:g} s of every step (at most half the step) are left out of "
              "the per-step numbers (users still starting, queues filling); the whole-run rows include them, and so "
              "do the per-step failures and popular-answers columns (no failure is hidden). Percentiles are "
              "nearest-rank over every request (failed ones included); QPS counts every request.", ""]
    if summary.get("user_errors"):
        lines += [f"**{summary['user_errors']} errors inside the locustfile** (see locust_exceptions.csv).", ""]
    return "\n".join(lines)


def _step_table(summary: dict[str, Any]) -> list[str]:
    """One row a step: all requests, then the criterion endpoint's p50/p99 (when it is one endpoint)."""
    endpoint = summary.get("slo_endpoint", "total")
    extra = "" if endpoint == "total" else f" `{endpoint}` p50 ms | `{endpoint}` p99 ms |"
    lines = [f"| step | users | requests | QPS | p50 ms | p95 ms | p99 ms |{extra} failures | popular answers |",
             "|---:" * (9 + 2 * bool(extra)) + "|"]
    for s in summary["steps"]:
        mine = s["endpoints"].get(endpoint, {}) if extra else {}
        cells = f" {_ms(mine.get('p50_ms'))} | {_ms(mine.get('p99_ms'))} |" if extra else ""
        lines.append(f"| {s['step']} | {s['users']} | {s['requests']} | {s['qps']:.2f} | {_ms(s['p50_ms'])} | "
                     f"{_ms(s['p95_ms'])} | {_ms(s['p99_ms'])} |{cells} {s['failures'] + s['warmup_failures']} | "
                     f"{sum(s['fallbacks'].values())} |")
    return lines


def _selection_line(summary: dict[str, Any]) -> str:
    low, best = summary["low_load_p50_ms"], summary["max_qps_p99_under_2x_low_p50"]
    whose = summary.get("slo_endpoint", "total")
    whose = "all requests" if whose == "total" else f"`{whose}`"
    if low is None:
        return f"No request of {whose} was measured: no low-load p50."
    if best is None:
        return (f"Low-load p50 of {whose} {low:.1f} ms; **no step** kept its p99 under 2x that ({2 * low:.1f} ms) "
                "without a failure or a shed-load (non-cold-start) popular answer.")
    users = f"{best['users']} user" + ("" if best["users"] == 1 else "s")
    return (f"Low-load p50 of {whose} {low:.1f} ms. **Highest QPS whose {whose} p99 < 2x that "
            f"({best['p99_limit_ms']:.1f} ms), with no failure and no shed load: {best['qps']:.2f} QPS** "
            "(all requests; "
            f"{best['endpoint_qps']:.2f} of them {whose}) at {users} (p50 {best['p50_ms']:.1f} ms, "
            f"p99 {best['p99_ms']:.1f} ms).")


def _fallback_line(fallbacks: dict[str, Any]) -> str:
    if not fallbacks["total"]:
        return "Every /recommend answer came from the model (no popular fallback)."
    reasons = ", ".join(f"{reason} {count}" for reason, count in fallbacks["by_reason"].items())
    return (f"Popular (fallback) answers: {fallbacks['total']} ({100 * fallbacks['share_of_recommend']:.1f}% of "
            f"/recommend): {reasons}. They count as successes.")


def bin_edges(step_edges: Sequence[float], bin_s: float) -> list[float]:
    """Plot bin edges: every step (between consecutive `step_edges`) cut into equal bins of about `bin_s` seconds,
    so that no bin straddles two steps."""
    edges = [step_edges[0]]
    for start, end in itertools.pairwise(step_edges):
        n = max(1, round((end - start) / bin_s))
        edges += [start + (end - start) * (i + 1) / n for i in range(n)]
    return edges


def latency_series(records: Sequence[Record], edges: Sequence[float]
                   ) -> tuple[list[float], dict[int, list[float | None]], list[int]]:
    """Per bin [edges[i], edges[i+1]) (by request start; the last bin also takes anything later): the bin centres,
    p50/p95/p99 of the bin's latencies and its failures."""
    bins = len(edges) - 1
    latencies: list[list[float]] = [[] for _ in range(bins)]
    failures = [0] * bins
    for r in records:
        index = min(max(bisect.bisect_right(edges, r.start_s) - 1, 0), bins - 1)
        latencies[index].append(r.latency_ms)
        failures[index] += not r.ok
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    return centres, {q: [percentile(values, q) for values in latencies] for q in (50, 95, 99)}, failures


def bin_width(requests: int, duration_s: float, shortest_step_s: float, per_bin: int = 50) -> float:
    """Seconds per plot bin: about `per_bin` requests a bin (so that p95/p99 mean something), at least 1 s and
    at most half the shortest step (so that the steps stay apart)."""
    if requests <= 0 or duration_s <= 0:
        return 1.0
    return max(1.0, min(per_bin * duration_s / requests, shortest_step_s / 2))


def plot_latency(path: Path, records: Sequence[Record], steps: Sequence[dict[str, Any]], duration_s: float) -> None:
    """latency.png: every request as a dot (its start, its latency; failures as red crosses), p50/p95/p99 over time
    bins, users on the right axis, step boundaries dashed and warm-ups shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    step_edges = [s["start_s"] for s in steps] + [steps[-1]["end_s"]] if steps else [0.0, max(duration_s, 1.0)]
    shortest = min(b - a for a, b in itertools.pairwise(step_edges))
    bin_s = bin_width(len(records), duration_s, shortest)
    centres, series, _ = latency_series(records, bin_edges(step_edges, bin_s))
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=100)
    for name, colour in zip(sorted({r.name for r in records}), ("tab:cyan", "tab:olive", "tab:purple"), strict=False):
        mine = [r for r in records if r.name == name and r.ok]
        ax.scatter([r.start_s for r in mine], [r.latency_ms for r in mine], s=4, alpha=0.25, color=colour,
                   label=f"{name} (each request)", rasterized=True)
    failed = [r for r in records if not r.ok]
    if failed:
        ax.scatter([r.start_s for r in failed], [r.latency_ms for r in failed], s=25, marker="x", color="red",
                   label="failed request")
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        ax.plot(centres, [math.nan if v is None else v for v in series[q]], style, linewidth=2, label=f"p{q}")
    users_ax = ax.twinx()
    for s in steps:
        ax.axvline(s["start_s"], color="grey", linestyle="--", linewidth=0.8)
        ax.axvspan(s["start_s"], s["start_s"] + s["warmup_s"], color="grey", alpha=0.12)
    if steps:
        times = [s["start_s"] for s in steps] + [steps[-1]["end_s"]]
        users = [s["users"] for s in steps] + [steps[-1]["users"]]
        users_ax.step(times, users, where="post", color="black", alpha=0.6, label="users")
    ax.set_xlabel(f"seconds since start (by request start; percentiles of all requests over bins of ~{bin_s:.2g} s)")
    ax.set_ylabel("latency (ms)")
    users_ax.set_ylabel("users")
    users_ax.set_ylim(bottom=0)
    users_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = users_ax.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="upper left", fontsize="small")
    ax.set_title("Latency over time (shaded: warm-up, left out of the per-step numbers)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
