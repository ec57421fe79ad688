"""`python -m loadtest.chaos`: a bounded locust load on a local stack it starts itself, faults injected one after the
other, and per fault the failed requests, the p99, the time to recover and the acknowledged events missing."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from loadtest.chaos_events import HISTORY_PREFIX, histories, missing_events, read_attempts
from loadtest.run import LOCUSTFILE, LoadTestError, Mix, Target, locust_command, start_locust, stop_group, write_report
from loadtest.stats import Record, percentile, read_records
from loadtest.steps import Step
from stack.gateway import GatewayProcess
from stack.probes import get_json, pid_alive, port_free
from stack.redis_cluster import BUS_PORT_OFFSET, RedisCluster
from stack.redis_server import RedisServer
from stack.triton import REPLICA_PORT_STRIDE

log = logging.getLogger(__name__)
CHAOS_LOCUSTFILE = Path(__file__).with_name("chaos_locustfile.py")
FAULTS = ("triton-hang", "redis-failover", "gateway-restart", "triton-kill")
UP_TIMEOUT_S = 600.0
DOWN_TIMEOUT_S = 120.0
LOAD_STARTED = "Shape test starting"  # locust.runners logs it as the shape starts
SLOW_MS = 1000.0  # an answer slower than this is not yet a recovered one
LOCUST_GRACE_S = 60.0  # past the schedule, before locust is stopped
ENDPOINTS = ("/recommend", "/events")


class ChaosError(RuntimeError):
    """The harness could not run (the stack did not come up, locust failed, a fault could not be injected)."""


@dataclass(frozen=True)
class ChaosConfig:
    """What to run: the trained run, the stack's shape, the load and the faults' timing."""

    run: Path
    out: Path
    model_repo: Path | None = None
    faults: tuple[str, ...] = FAULTS
    users: int = 4
    warmup_s: float = 10.0  # load before the first fault
    gap_s: float = 25.0  # from one fault's injection to the next (and to the end after the last)
    hang_s: float = 5.0  # how long Triton stays SIGSTOPped
    triton_replicas: int = 2
    # gateway worker processes: with >= 2, gateway-restart is uvicorn's rolling restart (each replacement worker
    # serves before the old one retires), as a Deployment's rolling update is; with 1, a stop and a start
    gateway_workers: int = 2
    beam_width: int = 16
    wait_max_s: float = 0.05
    command: str = ""  # how it was invoked, for the report


@dataclass
class FaultEvent:
    """One injected fault: when (unix time) it began and was cleared, and what was done."""

    name: str
    injected_at: float = 0.0
    cleared_at: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""


class Stack:
    """What the harness reads of `onerec up`'s stack.json (loadtest does not import stack.local, which pulls in
    the gateway's code) and the pids it updates there after restarting a process, so `onerec down` stops them."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "stack.json"
        try:
            self.raw: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ChaosError(f"{self.path}: no stack description ({e})") from e
        self.gateway_url: str = self.raw["gateway_url"]
        self.redis_url: str = self.raw["redis_url"]
        self.redis_urls: list[str] = self.raw["redis_urls"]
        self.users_file: str = self.raw["users_file"]
        self.videos_file: str = self.raw["videos_file"]
        self.triton_replicas: list[dict] = self.raw["triton_replicas"]
        self.pids: dict[str, int] = self.raw["pids"]
        self.logs: dict[str, str] = self.raw["logs"]

    def write(self, state_dir: Path) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.raw, "pids": self.pids}, indent=2) + "\n")
        tmp.replace(self.path)


# --- the stack --------------------------------------------------------------------------------------------------


def port_block(offsets: Sequence[int], start: int) -> int:
    """A first port p with every p + offset free on loopback (searched upwards from `start`)."""
    for base in range(start, 60000 - max(offsets), 97):
        if all(port_free("127.0.0.1", base + o) for o in offsets):
            return base
    raise ChaosError("no free block of ports on 127.0.0.1")


def onerec(*args: object, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "ONEREC_PROGRESS": "0"})


def stack_up(cfg: ChaosConfig, state_dir: Path) -> Stack:
    """`onerec up` with a 3-master Redis Cluster (1 replica each) and `triton_replicas` tritonservers."""
    triton = port_block([REPLICA_PORT_STRIDE * i + k for i in range(cfg.triton_replicas) for k in range(3)], 21000)
    redis_port = port_block([p + bus for p in range(6) for bus in (0, BUS_PORT_OFFSET)], 24000)
    gateway = port_block([0], 27000)
    flags: list[object] = ["--run", cfg.run, "--state-dir", state_dir, "--gateway-port", gateway,
                           "--redis-port", redis_port, "--redis-cluster", 3, "--redis-replicas", 1,
                           "--triton-http-port", triton, "--triton-grpc-port", triton + 1,
                           "--triton-metrics-port", triton + 2, "--triton-replicas", cfg.triton_replicas,
                           "--workers", cfg.gateway_workers, "--beam-width", cfg.beam_width, "--timeout", 300, "--json"]
    if cfg.model_repo is not None:
        flags += ["--model-repo", cfg.model_repo]
    log.info("onerec up %s", " ".join(map(str, flags)))
    done = onerec("up", *flags, timeout=UP_TIMEOUT_S)
    if done.returncode != 0:
        raise ChaosError(f"onerec up failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return Stack(state_dir)


def stack_down(cfg: ChaosConfig, state_dir: Path) -> None:
    done = onerec("down", "--run", cfg.run, "--state-dir", state_dir, timeout=DOWN_TIMEOUT_S)
    if done.returncode != 0:
        log.error("onerec down failed (%d): %s", done.returncode, done.stderr[-2000:])


def server_pid(replica: dict) -> int:
    """The tritonserver's own pid (the stack's pid is the `onerec triton` wrapper's)."""
    return int((Path(replica["workdir"]) / "tritonserver.pid").read_text())


def cluster_of(state: Stack, state_dir: Path) -> RedisCluster:
    """A RedisCluster handle on the stack's running nodes (for roles and failovers; it starts nothing)."""
    ports = sorted(int(url.rsplit(":", 1)[1].split("/")[0]) for url in state.redis_urls)
    return RedisCluster(state_dir / "redis-cluster", ports[0], 3, (len(ports) // 3) - 1)


# --- the faults -------------------------------------------------------------------------------------------------


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ChaosError(f"{what} not within {timeout:.0f}s")
        time.sleep(0.05)


def triton_hang(cfg: ChaosConfig, state: Stack, state_dir: Path, event: FaultEvent) -> None:
    """SIGSTOP every tritonserver for `hang_s` (connections open, nothing answered), then SIGCONT."""
    pids = [server_pid(r) for r in state.triton_replicas]
    event.detail["pids"] = pids
    event.injected_at = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(cfg.hang_s)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        event.cleared_at = time.time()


def redis_failover(cfg: ChaosConfig, state: Stack, state_dir: Path, event: FaultEvent) -> None:
    """SIGKILL the master of a loaded user's slot; cleared once its replica has taken over; the killed node is then
    started again on its directory (it rejoins as a replica) and stack.json points at it."""
    cluster = cluster_of(state, state_dir)
    users = Path(state.users_file).read_text().split()
    master = master_of(cluster, f"{HISTORY_PREFIX}{{{users[0]}}}")
    replicas = cluster.replicas_of(master)
    if not replicas:
        raise ChaosError(f"{master.url} has no replica")
    pid = state.pids[f"redis:{master.port}"]
    event.detail.update({"killed": master.port, "pid": pid})
    event.injected_at = time.time()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: any(cluster.role(r) == "master" for r in replicas), 30.0, "a replica taking over")
    event.cleared_at = time.time()
    event.detail["new_master"] = next(r.port for r in replicas if cluster.role(r) == "master")
    wait_until(lambda: not pid_alive(pid), 10.0, "the killed node gone")
    fresh = cluster.restart_node(master)
    assert fresh.process is not None
    reap(fresh.process)
    state.pids[f"redis:{master.port}"] = fresh.process.pid
    state.write(state_dir)
    event.detail["rejoined_as"] = cluster.role(fresh)


def master_of(cluster: RedisCluster, key: str) -> RedisServer:
    """The node serving `key`'s slot now, asked of the first node that answers (RedisCluster.master_of wants nodes
    this process started)."""
    for node in cluster.nodes:
        client = redis.Redis(host=node.host, port=node.port, socket_timeout=2, socket_connect_timeout=2)
        try:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, owner, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return cluster.node_at(int(owner[1]))
        except (redis.RedisError, OSError):
            continue
        finally:
            client.close()
    raise ChaosError(f"no cluster node says who serves {key}")


def gateway_restart(cfg: ChaosConfig, state: Stack, state_dir: Path, event: FaultEvent) -> None:
    """Restart the gateway. With >= 2 workers a rolling restart: SIGHUP to uvicorn's supervisor, which starts each
    replacement worker and waits until it serves before it retires an old one (what a Deployment's rolling update
    does with several pods); cleared once every worker is a new process and /readyz answers 200. With one worker:
    SIGTERM (uvicorn drains), then a new gateway with the same ONEREC_* settings (stack.json gets its pid)."""
    pid = state.pids["gateway"]
    event.detail["old_pid"] = pid
    if cfg.gateway_workers >= 2:
        old = worker_pids(pid)
        event.detail.update({"mode": "rolling (SIGHUP)", "old_workers": sorted(old)})
        event.injected_at = time.time()
        os.kill(pid, signal.SIGHUP)  # the supervisor only: a worker would die of SIGHUP
        wait_until(lambda: len(worker_pids(pid)) == cfg.gateway_workers and not worker_pids(pid) & old, 180.0,
                   "every gateway worker replaced")
        wait_until(lambda: get_json(state.gateway_url + "/readyz")[0] == 200, 60.0, "the gateway ready")
        event.cleared_at = time.time()
        event.detail["new_workers"] = sorted(worker_pids(pid))
        return
    settings = {k: v for k, v in process_environ(pid).items() if k.startswith("ONEREC_")}
    port = int(state.gateway_url.rsplit(":", 1)[1])
    event.detail["mode"] = "stop and start (one worker)"
    event.injected_at = time.time()
    os.killpg(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 60.0, "the gateway exiting")
    gateway = GatewayProcess(port, settings, Path(state.logs["gateway"]), "127.0.0.1")
    gateway.start(ready_timeout=120.0)
    event.cleared_at = time.time()
    assert gateway.process is not None
    reap(gateway.process)
    state.pids["gateway"] = gateway.process.pid
    state.write(state_dir)
    (state_dir / "gateway.pid").write_text(f"{gateway.process.pid}\n")
    event.detail["new_pid"] = gateway.process.pid


def worker_pids(pid: int) -> set[int]:
    """uvicorn's workers under its supervisor `pid` (Linux /proc): the children multiprocessing spawned to run a
    function (`spawn_main`), not its resource tracker."""
    workers: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in task.read_text().split():
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                        workers.add(int(child))
    return workers


def triton_kill(cfg: ChaosConfig, state: Stack, state_dir: Path, event: FaultEvent) -> None:
    """SIGKILL the last Triton replica's server (not restarted: the rest of the run is on the others)."""
    if len(state.triton_replicas) < 2:
        event.skipped = "needs --triton-replicas >= 2"
        return
    replica = state.triton_replicas[-1]
    pid = server_pid(replica)
    event.detail.update({"replica": replica["name"], "pid": pid})
    event.injected_at = time.time()
    os.kill(pid, signal.SIGKILL)
    event.cleared_at = event.injected_at  # nothing clears a death


INJECT: dict[str, Callable[[ChaosConfig, Stack, Path, FaultEvent], None]] = {
    "triton-hang": triton_hang, "redis-failover": redis_failover, "gateway-restart": gateway_restart,
    "triton-kill": triton_kill}


def reap(process: subprocess.Popen) -> None:
    """Wait for a process this harness restarted in the background, so that once `onerec down` stops it, it is
    gone (not a zombie child of ours that `onerec down` would wait out)."""
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()


def process_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


# --- per-fault numbers ----------------------------------------------------------------------------------------------


def bad(record: Record, slow_ms: float) -> bool:
    """Not a recovered answer: failed, popular items instead of the model's, or slower than `slow_ms`."""
    return (not record.ok or (record.name == "/recommend" and bool(record.fallback))
            or record.latency_ms > slow_ms)


def fault_stats(records: Sequence[Record], start_s: float, end_s: float, cleared_s: float,
                slow_ms: float = SLOW_MS) -> dict[str, Any]:
    """The requests that ended in [start_s, end_s) (offsets into the load): failures by endpoint, popular
    fallbacks, p99, and the time to recover: from the injection to the end of the last bad request of the window
    (failed, a popular fallback, or slower than `slow_ms`; 0 when there was none; None when no good /recommend
    started after it within the window)."""
    window = [r for r in records if start_s <= r.start_s + r.latency_ms / 1000 < end_s]
    by_endpoint = {}
    for name in ENDPOINTS:
        mine = [r for r in window if r.name == name]
        by_endpoint[name] = {"requests": len(mine), "failures": sum(not r.ok for r in mine),
                             "p99_ms": percentile([r.latency_ms for r in mine], 99)}
    bads = [r for r in window if bad(r, slow_ms)]
    recover_s: float | None = 0.0
    if bads:
        last_bad_end = max(r.start_s + r.latency_ms / 1000 for r in bads)
        good_after = any(r.name == "/recommend" and not bad(r, slow_ms) and r.start_s >= last_bad_end for r in window)
        recover_s = round(last_bad_end - start_s, 3) if good_after else None
    return {"window_s": [round(start_s, 3), round(end_s, 3)], "cleared_after_s": round(cleared_s - start_s, 3),
            "requests": len(window), "failures": sum(not r.ok for r in window),
            "fallbacks": sum(r.name == "/recommend" and bool(r.fallback) for r in window),
            "slow": sum(r.latency_ms > slow_ms for r in window),
            "p99_ms": percentile([r.latency_ms for r in window], 99),
            "max_ms": max((r.latency_ms for r in window), default=None), "endpoints": by_endpoint,
            "recover_s": recover_s}


# --- the run ---------------------------------------------------------------------------------------------------------


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Start the stack, run the load with the faults, stop the stack; the report (also OUT/chaos.json)."""
    unknown = sorted(set(cfg.faults) - set(FAULTS))
    if unknown:
        raise ChaosError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "stack"
    load_dir = out / "load"
    duration = cfg.warmup_s + cfg.gap_s * len(cfg.faults)
    state = stack_up(cfg, state_dir)
    try:
        users = Path(state.users_file).read_text().split()
        client = redis.RedisCluster.from_url(state.redis_url, decode_responses=True)
        before = histories(client, users)
        client.close()
        target = Target(state.gateway_url, Path(state.users_file), Path(state.videos_file))
        mix = Mix(wait_max_s=cfg.wait_max_s, warmup_s=0.0)
        command = locust_command(target, load_dir, [Step(cfg.users, duration, float(cfg.users))], mix)
        command[command.index(str(LOCUSTFILE))] = str(CHAOS_LOCUSTFILE)
        load_dir.mkdir(parents=True, exist_ok=True)
        locust = start_locust(command, load_dir)
        try:
            started = wait_load_started(load_dir / "locust.log", locust)
            events = inject_all(cfg, state, state_dir, started)
            code = locust.wait(timeout=max(1.0, started + duration + LOCUST_GRACE_S - time.time()))
        except BaseException:
            stop_group(locust)  # locust runs in its own session: stop it with the harness
            raise
        if code != 0:
            raise ChaosError(f"locust exited with {code}; see {load_dir / 'locust.log'}")
        summary = write_report(load_dir, {"url": state.gateway_url, "chaos": True})
        client = redis.RedisCluster.from_url(state.redis_url, decode_responses=True)
        after = histories(client, users)
        client.close()
    finally:
        stack_down(cfg, state_dir)
    (out / "histories.json").write_text(json.dumps({"before": before, "after": after}) + "\n")
    load_started = json.loads((load_dir / "steps.json").read_text())["started_at_unix"]
    records = read_records(load_dir / "records.csv")
    report = build_report(cfg, events, records, load_started, duration, summary,
                          missing_events(before, after, read_attempts(load_dir)))
    (out / "chaos.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def wait_load_started(log_path: Path, locust: subprocess.Popen, timeout: float = 60.0) -> float:
    """The time locust's shape started (its log says so), so that the faults are timed from the first requests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if LOAD_STARTED in log_path.read_text(errors="replace"):
            return time.time()
        if locust.poll() is not None:
            raise ChaosError(f"locust exited with {locust.returncode} before the load started; see {log_path}")
        time.sleep(0.1)
    raise ChaosError(f"locust did not start the load within {timeout:.0f}s; see {log_path}")


def inject_all(cfg: ChaosConfig, state: Stack, state_dir: Path, started: float) -> list[FaultEvent]:
    """Each fault at warmup + i * gap seconds into the load (as measured here), one after the other."""
    events = []
    for i, name in enumerate(cfg.faults):
        time.sleep(max(0.0, started + cfg.warmup_s + i * cfg.gap_s - time.time()))
        event = FaultEvent(name)
        log.info("fault %s", name)
        try:
            INJECT[name](cfg, state, state_dir, event)
        except (RuntimeError, OSError) as e:  # the stack's helpers raise RuntimeError
            raise ChaosError(f"fault {name}: {e}") from e
        log.info("fault %s done: %s", name, event.skipped or event.detail)
        events.append(event)
    return events


def build_report(cfg: ChaosConfig, events: Sequence[FaultEvent], records: Sequence[Record], load_started: float,
                 duration: float, summary: dict[str, Any], events_check: dict[str, Any]) -> dict[str, Any]:
    faults = []
    for i, event in enumerate(events):
        row: dict[str, Any] = {"fault": event.name, "detail": event.detail}
        if event.skipped:
            row["skipped"] = event.skipped
        else:
            start = event.injected_at - load_started
            end = (events[i + 1].injected_at - load_started) if i + 1 < len(events) and events[i + 1].injected_at \
                else duration
            row.update(fault_stats(records, start, end, event.cleared_at - load_started))
        faults.append(row)
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
            "command": cfg.command, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
            "duration_s": duration, "faults": faults, "total": summary.get("total", {}), "events": events_check}


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return (f"{platform.node()}: {platform.machine()} {model or '(CPU model unknown)'}, {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """The per-fault table with the command, the machine and the date."""
    lines = [f"Command: `{report['command'] or 'python -m loadtest.chaos'}`  ",
             f"Machine: {report['machine']}  ", f"Date: {report['date']}  ",
             f"Load: {report['config']['users']} locust users for {report['duration_s']:.0f} s, Redis Cluster 3 "
             f"masters x 1 replica, {report['config']['triton_replicas']} Triton replica(s), beam "
             f"{report['config']['beam_width']}",
             "", f"A fault's window runs from its injection to the next one's; *cleared* is when the fault was undone "
             f"(SIGCONT, a replica took over, the new gateway ready; a kill is never undone), *recovered* the end of "
             f"the window's last failed, popular-fallback or over-{SLOW_MS:.0f}-ms answer, both counted from the "
             f"injection.", "",
             "| fault | requests | failed /recommend | failed /events | popular fallbacks | p99 ms | max ms | "
             "cleared after s | recovered after s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["faults"]:
        if "skipped" in row:
            lines.append(f"| {row['fault']} | skipped: {row['skipped']} | | | | | | | |")
            continue
        ep = row["endpoints"]
        recover = "not within the window" if row["recover_s"] is None else f"{row['recover_s']:.1f}"
        lines.append(f"| {row['fault']} | {row['requests']} | {ep['/recommend']['failures']} | "
                     f"{ep['/events']['failures']} | {row['fallbacks']} | {_ms(row['p99_ms'])} | "
                     f"{_ms(row['max_ms'])} | "
                     f"{row['cleared_after_s']:.1f} | {recover} |")
    ev = report["events"]
    lines += ["", f"Acknowledged /events: {ev['acknowledged']} of {ev['attempted']} sent; missing from Redis "
              f"afterwards: **{ev['missing']}** (of the {ev['over_cap_users']} user(s) sent more videos than the "
              f"history cap, only the latest events are checked: {ev['acknowledged_unchecked']} older acknowledged "
              "events were trimmed by design)."]
    return "\n".join(lines) + "\n"


TABLE_BEGIN = "<!-- chaos table: written by python -m loadtest.chaos --doc -->"
TABLE_END = "<!-- end of the chaos table -->"


def write_doc(path: Path, table: str) -> None:
    """The table between its markers in `path` (what is around them is kept), or a new file holding it."""
    block = f"{TABLE_BEGIN}\n{table}{TABLE_END}\n"
    text = path.read_text() if path.is_file() else ""
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        path.write_text(head + block + rest.split(TABLE_END, 1)[1].lstrip("\n"))
        return
    path.write_text("# Reliability: chaos under load\n\n`python -m loadtest.chaos` (`make chaos`) starts a local stack "
                    "(`onerec up --redis-cluster 3 --redis-replicas 1 --triton-replicas N`), runs a bounded locust "
                    "load and injects the faults one after the other.\n\n" + block)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory")
    parser.add_argument("--model-repo", type=Path, default=None,
                        help="the Triton repository (default RUN/model_repo; exported there if it has no version)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/chaos/<UTC time>/)")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, in order (default %(default)s)")
    parser.add_argument("--users", type=int, default=ChaosConfig.users, help="locust users (default %(default)s)")
    parser.add_argument("--warmup-s", type=float, default=ChaosConfig.warmup_s)
    parser.add_argument("--gap-s", type=float, default=ChaosConfig.gap_s, help="seconds from one fault to the next")
    parser.add_argument("--hang-s", type=float, default=ChaosConfig.hang_s, help="how long Triton stays stopped")
    parser.add_argument("--triton-replicas", type=int, default=ChaosConfig.triton_replicas)
    parser.add_argument("--gateway-workers", type=int, default=ChaosConfig.gateway_workers,
                        help="uvicorn workers; >= 2 makes gateway-restart a rolling restart (default %(default)s)")
    parser.add_argument("--beam-width", type=int, default=ChaosConfig.beam_width)
    parser.add_argument("--doc", type=Path, default=None, help="also write the Markdown table to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """0: ran, no failed /recommend and no acknowledged event missing; 3: ran with failures or losses; 1: error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out or Path("runs") / "chaos" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    cfg = ChaosConfig(args.run, out, args.model_repo, tuple(f for f in args.faults.split(",") if f), args.users,
                      args.warmup_s, args.gap_s, args.hang_s, args.triton_replicas, args.gateway_workers,
                      args.beam_width,
                      command=" ".join(["python -m loadtest.chaos", *(sys.argv[1:] if argv is None else argv)]))
    try:
        report = run_chaos(cfg)
    except (ChaosError, LoadTestError, subprocess.TimeoutExpired) as e:
        log.error("%s", e)
        return 1
    table = markdown(report)
    if args.doc is not None:
        write_doc(args.doc, table)
    print(table)
    print(f"results: {out}")
    failed = any(row.get("endpoints", {}).get("/recommend", {}).get("failures", 0) for row in report["faults"])
    return 3 if failed or report["events"]["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
