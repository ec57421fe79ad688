"""`python -m loadtest.run`: locust headless against a gateway for a bounded time, then the summary, the plot and
the exact per-step numbers in one output directory."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.report import build_summary, plot_latency, read_locust_stats, summary_markdown, write_summary_json
from loadtest.stats import SLO_ENDPOINT, read_records
from loadtest.steps import DEFAULT_STEPS, Step, format_steps, parse_steps, total_duration

log = logging.getLogger(__name__)
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GRACE_S = 30.0  # how long past the schedule's end locust may take to stop before it is killed
TERM_WAIT_S = 10.0


class LoadTestError(RuntimeError):
    """locust did not run to the end (failed to start, crashed, or ran past its bound)."""


@dataclass(frozen=True)
class Target:
    url: str
    users_file: Path
    videos_file: Path


@dataclass(frozen=True)
class Mix:
    """The traffic (Zipf exponent and seed, endpoint weights, think time) and how it is judged (warm-up left out
    per step, the endpoint whose latencies the max-QPS criterion reads, "total" for all requests)."""

    zipf_s: float = 1.1
    seed: int = 0
    recommend_weight: float = 4.0
    events_weight: float = 1.0
    wait_max_s: float = 0.0
    warmup_s: float = 3.0
    slo_endpoint: str = SLO_ENDPOINT


def target_from_run(run: Path) -> Target:
    """The gateway URL and the users/videos files that `onerec up --run RUN` wrote into RUN/stack/stack.json."""
    path = run / "stack" / "stack.json"
    try:
        stack = json.loads(path.read_text())
        return Target(stack["gateway_url"], Path(stack["users_file"]), Path(stack["videos_file"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadTestError(f"{path}: no usable stack description ({e}); is the stack up (onerec up --run {run})?"
                            ) from e


def default_out_dir() -> Path:
    return Path("runs") / "loadtest" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def locust_command(target: Target, out_dir: Path, steps: Sequence[Step], mix: Mix) -> list[str]:
    """The locust command line: headless, CSV (full history) + HTML, only the final summary on stdout."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", target.url,
            "--csv", str(out_dir / "locust"), "--csv-full-history", "--html", str(out_dir / "report.html"),
            "--only-summary", "--loglevel", "INFO", "--exit-code-on-error", "0",
            "--steps", format_steps(steps), "--users-file", str(target.users_file),
            "--videos-file", str(target.videos_file), "--zipf-s", str(mix.zipf_s), "--seed", str(mix.seed),
            "--recommend-weight", str(mix.recommend_weight), "--events-weight", str(mix.events_weight),
            "--wait-max-s", str(mix.wait_max_s), "--warmup-s", str(mix.warmup_s),
            "--slo-endpoint", mix.slo_endpoint, "--out-dir", str(out_dir)]


def locust_env() -> dict[str, str]:
    """The environment with the repository importable (the locustfile imports `loadtest`) and no stray LOCUST_*
    settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "LOADTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start_locust(command: list[str], out_dir: Path) -> subprocess.Popen[Any]:
    """Start `command` (`locust_command`) in its own session, its output in OUT/locust.log; stop it with
    `stop_group`."""
    log.info("running %s", " ".join(command))
    with (out_dir / "locust.log").open("w") as output:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                env=locust_env(), start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A parent started in the background of a script ignores
    SIGINT, the child would inherit that, and `stop_group`'s SIGINT (locust's graceful stop, which writes the
    records) would do nothing until SIGTERM killed it writing nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_locust(command: list[str], out_dir: Path, timeout_s: float) -> None:
    """Run locust to completion within `timeout_s` (else `stop_group`: SIGINT, SIGTERM, SIGKILL to its process
    group); its output goes to OUT/locust.log. Raises LoadTestError unless it exited 0."""
    log_path = out_dir / "locust.log"
    process = start_locust(command, out_dir)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(process)
        raise LoadTestError(f"locust ran past {timeout_s:g} s and was stopped; see {log_path}") from None
    except BaseException:  # Ctrl-C: locust runs in its own session and would not see it
        stop_group(process)
        raise
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise LoadTestError(f"locust exited with code {code}; see {log_path}:\n{tail}")


def stop_group(process: subprocess.Popen[Any]) -> None:
    """SIGINT the process group (locust handles it as Ctrl-C: it stops the users and writes its results on the way
    out; it dies at once on SIGTERM, writing nothing), then SIGTERM and SIGKILL if it lingers."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=TERM_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_loadtest(url: str, users_file: Path, videos_file: Path, out_dir: Path, steps: Sequence[Step] | str,
                 timeout_s: float | None = None, mix: Mix | None = None) -> dict[str, Any]:
    """Run locust headless against `url` with the step schedule `steps` and write, in `out_dir`: locust_*.csv,
    report.html, locust.log, steps.json, records.csv, summary.json, summary.md, latency.png. Returns the summary.
    The run is bounded by `timeout_s` (default: the schedule plus 30 s). Raises LoadTestError if locust fails."""
    steps = parse_steps(steps) if isinstance(steps, str) else list(steps)
    mix = mix or Mix()
    target = Target(url, Path(users_file), Path(videos_file))
    for path in (target.users_file, target.videos_file):
        if not path.is_file():
            raise LoadTestError(f"{path}: no such file")
    check_reachable(url)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"url": url, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "users_file": str(target.users_file), "videos_file": str(target.videos_file), "mix": asdict(mix)}
    bound = timeout_s if timeout_s is not None else total_duration(steps) + DEFAULT_GRACE_S
    try:
        run_locust(locust_command(target, out_dir, steps, mix), out_dir, bound)
    except LoadTestError:
        if (out_dir / "steps.json").exists():  # stopped late or crashed on the way out: keep what it measured
            write_report(out_dir, {**meta, "incomplete": True})
        raise
    return write_report(out_dir, meta)


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Refuse to start when nothing answers at `url` (any HTTP answer to GET /healthz will do)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=timeout_s):  # noqa: S310 - our own URL
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise LoadTestError(f"nothing answers at {url} ({e}); is the gateway up?") from e


def write_report(out_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """summary.json, summary.md and latency.png from the files locust left in `out_dir`."""
    steps_path = out_dir / "steps.json"
    if not steps_path.exists():
        raise LoadTestError(f"locust finished without writing {steps_path}; see {out_dir / 'locust.log'}")
    stats = json.loads(steps_path.read_text())
    summary = build_summary(stats, read_locust_stats(out_dir / "locust_stats.csv"), meta)
    summary["files"] = {name: name for name in ("report.html", "locust_stats.csv", "locust_stats_history.csv",
                                                "locust_failures.csv", "steps.json", "records.csv", "latency.png",
                                                "summary.md")}
    write_summary_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    plot_latency(out_dir / "latency.png", read_records(out_dir / "records.csv"), summary["steps"],
                 summary["duration_s"])
    log.info("wrote %s", out_dir / "summary.json")
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__)
    where = parser.add_argument_group("target: --run, or --url with --users-file and --videos-file")
    where.add_argument("--run", type=Path, help="a run whose local stack is up (reads RUN/stack/stack.json)")
    where.add_argument("--url", help="the gateway, e.g. http://127.0.0.1:8080")
    where.add_argument("--users-file", type=Path, help="loaded user ids, one a line")
    where.add_argument("--videos-file", type=Path, help="catalog video ids, most popular first, one a line")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/loadtest/<UTC time>/)")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="USERSxSECONDS[@SPAWN_RATE],... (default %(default)s)")
    parser.add_argument("--warmup-s", type=float, default=Mix.warmup_s,
                        help="seconds left out at the start of each step's numbers (default %(default)s)")
    parser.add_argument("--slo-endpoint", default=Mix.slo_endpoint,
                        help="whose p50/p99 the max-QPS criterion reads ('total': all requests; default %(default)s)")
    parser.add_argument("--zipf-s", type=float, default=Mix.zipf_s, help="Zipf exponent (default %(default)s)")
    parser.add_argument("--seed", type=int, default=Mix.seed)
    parser.add_argument("--recommend-weight", type=float, default=Mix.recommend_weight)
    parser.add_argument("--events-weight", type=float, default=Mix.events_weight)
    parser.add_argument("--wait-max-s", type=float, default=Mix.wait_max_s,
                        help="think time per user, uniform in [0, this] (default 0: closed loop)")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help=f"hard bound on locust's wall time (default: the schedule + {DEFAULT_GRACE_S:g} s)")
    parser.add_argument("--fail-on-failures", action="store_true", help="exit 3 when any request failed")
    args = parser.parse_args(argv)
    if args.run is None and not (args.url and args.users_file and args.videos_file):
        parser.error("give --run RUN, or --url with --users-file and --videos-file")
    try:
        parse_steps(args.steps)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0: the run finished (and, with --fail-on-failures, nothing failed); 1: locust failed; 3: requests failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mix = Mix(args.zipf_s, args.seed, args.recommend_weight, args.events_weight, args.wait_max_s, args.warmup_s,
              args.slo_endpoint)
    out_dir = args.out or default_out_dir()
    try:
        target = target_from_run(args.run) if args.run else Target(args.url, args.users_file, args.videos_file)
        summary = run_loadtest(target.url, target.users_file, target.videos_file, out_dir, args.steps,
                               args.timeout_s, mix)
    except LoadTestError as e:
        logging.getLogger("loadtest").error("%s", e)
        return 1
    print(summary_markdown(summary))
    print(f"results: {out_dir}")
    if args.fail_on_failures and summary["total"]["failures"] > 0:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
