"""The local stack behind `onerec up` / `onerec down`: redis-server, tritonserver and the gateway as detached processes.

Redis is one redis-server, or with `redis_cluster` N a local Redis Cluster of N masters (and `redis_replicas` each)
from the same binary on consecutive ports from `redis_port`; the gateway and load-histories then run in cluster
mode, seeded by the first node. Triton is one tritonserver, or with `triton_replicas` N that many on the same
repository (replica i on each Triton port + 10·i); the gateway balances over all of them, the rollout commands
reach all of them through `stack.json`, and `prometheus.yml` in the state directory scrapes every one.

It serves a repository that already holds an exported version (`onerec up` exports first when it must). The
container commands in docker-compose.yml are the argument lists of `stack/commands.py`, so the local stack
and the tests cover what the containers run. Everything a stack writes lives in one state directory (default
`RUN/stack/`): `stack.json` (URLs, ports, pids), `{redis,triton,gateway}.pid`, `logs/`, Redis's append-only
file (a cluster's nodes under `redis-cluster/`), Triton's backend links (`triton/`, replica i's `triton-i/`),
`prometheus.yml`, and the `users.txt` / `videos.txt` the load tests draw from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onerec.errors import UsageError
from onerec.runs import RunDir
from onerec.serving import layout
from stack.child import ChildProcess
from stack.commands import gateway_args, load_histories_args, local_command, triton_args
from stack.gateway import GatewayProcess
from stack.probes import get_json, http_ok, kill_group_leftovers, pid_alive, port_free, post_json
from stack.prometheus import local_config
from stack.redis_cluster import BUS_PORT_OFFSET, RedisCluster, node_ports
from stack.redis_server import RedisServer
from stack.triton import EXIT_TIMEOUT_S, TritonPorts

log = logging.getLogger(__name__)

SERVICES = ("redis", "triton", "gateway")  # start order; `down` stops in reverse


@dataclass(frozen=True)
class StackConfig:
    """What `onerec up` starts. Ports default to the standard ones; every server listens on `host`."""

    run: Path
    model_repo: Path | None = None  # default RUN/model_repo
    state_dir: Path | None = None  # default RUN/stack
    host: str = "127.0.0.1"
    gateway_port: int = 8080
    redis_port: int = 6379  # a cluster's first node; the others follow on consecutive ports
    redis_cluster: int = 0  # masters of a local Redis Cluster; 0: one standalone redis-server
    redis_replicas: int = 0  # replicas per cluster master
    triton_ports: TritonPorts = field(default_factory=TritonPorts)  # replica 0's; replica i adds 10·i
    triton_replicas: int = 1  # tritonservers on the same repository; the gateway balances over them
    workers: int = 1
    beam_width: int = layout.DEFAULT_BEAM_WIDTH
    num_sessions: int = layout.DEFAULT_NUM_SESSIONS
    timeout_s: float = 300.0  # per server, for readiness

    @property
    def repo(self) -> Path:
        return (self.model_repo or self.run / "model_repo").resolve()

    @property
    def state(self) -> Path:
        return (self.state_dir or self.run / "stack").resolve()

    @property
    def replicas(self) -> list[TritonReplica]:
        """Each Triton replica's name (in pids), ports and work directory (replica 0: `triton`, `triton/`)."""
        return [TritonReplica("triton" if i == 0 else f"triton:{i}", self.triton_ports.replica(i),
                              self.state / ("triton" if i == 0 else f"triton-{i}"),
                              "triton.log" if i == 0 else f"triton-{i}.log") for i in range(self.triton_replicas)]

    @property
    def redis_mode(self) -> str:
        return "cluster" if self.redis_cluster else "standalone"

    def redis_env(self) -> dict[str, str]:
        """The ONEREC_* Redis settings of the gateway and load-histories. With replicas, an event is acknowledged
        only once a replica holds it (WAIT), so a master's death loses no acknowledged event."""
        env = {"ONEREC_REDIS_MODE": self.redis_mode}
        if self.redis_cluster and self.redis_replicas:
            env["ONEREC_REDIS_WAIT_REPLICAS"] = "1"
        return env


@dataclass(frozen=True)
class TritonReplica:
    """One tritonserver of the stack: its key in `pids`, its ports, its work directory (backend links, the
    server's log and pid file) and its `onerec triton` log's name under logs/."""

    name: str
    ports: TritonPorts
    workdir: Path
    log_name: str

    def urls(self, host: str) -> dict[str, str]:
        return {"http_url": f"http://{host}:{self.ports.http}", "grpc_url": f"{host}:{self.ports.grpc}",
                "metrics_url": f"http://{host}:{self.ports.metrics}/metrics"}


@dataclass
class StackState:
    """`stack.json`: how to reach and stop a running stack."""

    run: str
    model_repo: str
    gateway_url: str
    redis_url: str
    triton_http_url: str
    triton_grpc_url: str
    triton_metrics_url: str
    pids: dict[str, int]  # redis, triton, gateway; a cluster's nodes as redis:<port>
    logs: dict[str, str]
    users_file: str
    videos_file: str
    model_version: str | None = None
    started_at: float = 0.0
    redis_mode: str = "standalone"
    redis_urls: list[str] = field(default_factory=list)  # every cluster node (empty for one redis-server)
    # every Triton replica: {name, http_url, grpc_url, metrics_url, pid (`onerec triton`), workdir (its
    # tritonserver.pid is the server's own)}; triton_*_url above are the first's
    triton_replicas: list[dict] = field(default_factory=list)
    prometheus_config: str = ""  # a scrape config of this stack: the gateway and every replica

    @property
    def triton_http_urls(self) -> list[str]:
        """Every replica's HTTP address (what the rollout commands load on)."""
        return [replica["http_url"] for replica in self.triton_replicas] or [self.triton_http_url]

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / "stack.json"

    @classmethod
    def read(cls, state_dir: Path) -> StackState | None:
        path = cls.path(state_dir)
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise UsageError(f"{path}: not a stack state file ({e}); remove it") from e

    def write(self, state_dir: Path) -> None:
        tmp = self.path(state_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(self.path(state_dir))

    def alive(self) -> dict[str, bool]:
        return {name: pid_alive(pid) for name, pid in self.pids.items()}


class DetachedCommand(ChildProcess):
    """An `onerec ...` command the stack starts and leaves running (it outlives `onerec up`, in its own session)."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 15) -> int | None:
        """Give `onerec triton` the time Triton takes to drain before SIGKILL."""
        return super().stop(timeout)


class Stack:
    """Starts, reports and stops one local stack; `up` returns once the gateway's /readyz says ready."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.logs = cfg.state / "logs"

    # --- up ---------------------------------------------------------------------------------------------

    def up(self, before_start: Callable[[], None] | None = None) -> StackState:
        """Start the stack (or return the running one). `before_start` runs once the ports are known free and
        before any server starts: `onerec up` exports the run there when the repository needs it."""
        cfg = self.cfg
        run = RunDir(cfg.run)
        run.require("train")
        running = StackState.read(cfg.state)
        if running is not None:
            if all(running.alive().values()) and get_json(running.gateway_url + "/readyz")[0] == 200:
                log.info("the stack of %s is already running: %s", cfg.run, running.gateway_url)
                return running
            log.warning("a previous stack in %s is partly down (%s); restarting it", cfg.state, running.alive())
            self.down()
        self._check_ports()
        if before_start is not None:
            before_start()
        if layout.latest_version(cfg.repo) is None:
            raise UsageError(f"{cfg.repo}: no exported model version; run `onerec export` first")
        self.logs.mkdir(parents=True, exist_ok=True)
        started: dict[str, int] = {}
        try:
            redis_server = self._start_redis()
            nodes = redis_server.nodes if isinstance(redis_server, RedisCluster) else [redis_server]
            for node in nodes:
                started[f"redis:{node.port}" if cfg.redis_cluster else "redis"] = node.process.pid
            started.update(self._start_tritons())
            users, videos = self._load_histories(redis_server.url)
            gateway = self._start_gateway(redis_server.url)
            started["gateway"] = gateway.process.pid
        except BaseException:
            log.error("the stack did not come up; stopping what started (logs in %s)", self.logs)
            for name in reversed(list(started)):
                stop_pid(name, started[name])
            raise
        replicas = [{"name": r.name, **r.urls(cfg.host), "pid": started[r.name], "workdir": str(r.workdir)}
                    for r in cfg.replicas]
        logs = {"redis": str(nodes[0].log_path)}
        for r in cfg.replicas:
            logs[r.name] = str(self.logs / r.log_name)
            logs[r.name.replace("triton", "tritonserver")] = str(r.workdir / "tritonserver.log")
        state = StackState(
            run=str(cfg.run.resolve()), model_repo=str(cfg.repo), gateway_url=gateway.url, redis_url=redis_server.url,
            triton_http_url=replicas[0]["http_url"], triton_grpc_url=replicas[0]["grpc_url"],
            triton_metrics_url=replicas[0]["metrics_url"],
            pids=started, logs={**logs, "gateway": str(gateway.log_path),
                                "load-histories": str(self.logs / "load-histories.log")},
            users_file=str(users), videos_file=str(videos),
            model_version=get_json(gateway.url + "/readyz")[1].get("model_version"), started_at=time.time(),
            redis_mode=cfg.redis_mode, redis_urls=[node.url for node in nodes] if cfg.redis_cluster else [],
            triton_replicas=replicas, prometheus_config=str(self._write_scrape_config(gateway.url, replicas)))
        state.write(cfg.state)
        for name, pid in started.items():  # classic pid files too, for `kill $(cat RUN/stack/gateway.pid)`
            if name in SERVICES:
                (cfg.state / f"{name}.pid").write_text(f"{pid}\n")
        return state

    def _check_ports(self) -> None:
        cfg = self.cfg
        wanted = {"--gateway-port": cfg.gateway_port, "--redis-port": cfg.redis_port}
        for i, replica in enumerate(cfg.replicas):
            of = f" (replica {i}: +{replica.ports.http - cfg.triton_ports.http})" if i else ""
            wanted |= {f"--triton-http-port{of}": replica.ports.http, f"--triton-grpc-port{of}": replica.ports.grpc,
                       f"--triton-metrics-port{of}": replica.ports.metrics}
        if max(wanted.values()) > 65535:
            raise UsageError(f"--triton-replicas {cfg.triton_replicas}: replica ports go past 65535 ({wanted})")
        if len(set(wanted.values())) < len(wanted):
            raise UsageError(f"ports must differ: {wanted}")
        redis_ports = [cfg.redis_port]
        if cfg.redis_cluster:  # the nodes' ports follow --redis-port, their cluster buses 10000 above
            nodes = node_ports(cfg.redis_port, cfg.redis_cluster, cfg.redis_replicas)
            redis_ports = nodes + [p + BUS_PORT_OFFSET for p in nodes]
            clash = sorted(set(redis_ports) & (set(wanted.values()) - {cfg.redis_port}))
            if clash or max(redis_ports) > 65535:
                raise UsageError(f"--redis-port {cfg.redis_port}: the cluster's nodes take ports {nodes[0]}-"
                                 f"{nodes[-1]} and {nodes[0] + BUS_PORT_OFFSET}-{nodes[-1] + BUS_PORT_OFFSET}, "
                                 f"which clash with {clash or 'the port range'}; pick another --redis-port")
        taken = [f"{flag} {port}" for flag, port in wanted.items() if flag != "--redis-port"
                 and not port_free(cfg.host, port)]
        taken += [f"--redis-port {cfg.redis_port} (port {port})" if port != cfg.redis_port else
                  f"--redis-port {port}" for port in redis_ports if not port_free(cfg.host, port)]
        if taken:
            raise UsageError(f"in use on {cfg.host}: {', '.join(taken)} (another stack? `onerec down`, or pick "
                             "other ports)")

    def _start_redis(self) -> RedisServer | RedisCluster:
        cfg = self.cfg
        if cfg.redis_cluster:
            cluster = RedisCluster(cfg.state / "redis-cluster", cfg.redis_port, cfg.redis_cluster, cfg.redis_replicas,
                                   cfg.host)
            for node in cluster.nodes:
                node.log_path = self.logs / f"redis-{node.port}.log"
            return cluster.start(timeout=min(cfg.timeout_s, 60.0))
        server = RedisServer(cfg.state / "redis", cfg.redis_port, cfg.host)
        server.log_path = self.logs / "redis.log"
        return server.start()

    def _start_tritons(self) -> dict[str, int]:
        """`onerec triton` per replica as detached children, started together; their pids once every replica's
        /v2/health/ready answers (on a failure, the ones started are stopped)."""
        cfg = self.cfg
        started: dict[str, DetachedCommand] = {}
        try:
            for replica in cfg.replicas:
                args = triton_args(str(cfg.repo), cfg.host, str(replica.workdir), replica.ports)
                args += ["--timeout", str(cfg.timeout_s)]
                triton = DetachedCommand(f"tritonserver ({replica.name})", self.logs / replica.log_name)
                triton.spawn(local_command(args), env={**os.environ, "PYTHONUNBUFFERED": "1"})
                started[replica.name] = triton
            for replica in cfg.replicas:
                ready = f"http://{cfg.host}:{replica.ports.http}/v2/health/ready"
                try:
                    started[replica.name].wait_ready(lambda url=ready: http_ok(url), cfg.timeout_s + 10, poll=0.5)
                except RuntimeError as e:
                    raise UsageError(f"{str(e).splitlines()[0].rstrip(':')}; see {self.logs / replica.log_name} "
                                     f"and {replica.workdir / 'tritonserver.log'}") from e
                log.info("tritonserver %s ready on %s", replica.name, ready)
        except BaseException:
            for triton in started.values():
                triton.stop()
            raise
        return {name: triton.process.pid for name, triton in started.items()}

    def _write_scrape_config(self, gateway_url: str, replicas: list[dict]) -> Path:
        """`prometheus.yml` of this stack: the committed config, its jobs aimed at the gateway and every replica."""
        path = self.cfg.state / "prometheus.yml"
        metrics = [r["metrics_url"].removeprefix("http://").removesuffix("/metrics") for r in replicas]
        path.write_text(local_config({"gateway": gateway_url.removeprefix("http://"), "triton": metrics}))
        return path

    def _load_histories(self, redis_url: str) -> tuple[Path, Path]:
        users, videos = self.cfg.state / "users.txt", self.cfg.state / "videos.txt"
        args = load_histories_args(str(self.cfg.run), redis_url, str(users), str(videos))
        with open(self.logs / "load-histories.log", "ab") as out:
            done = subprocess.run(local_command(args), stdout=out, stderr=subprocess.STDOUT, timeout=600,
                                  env={**os.environ, "ONEREC_PROGRESS": "0", **self.cfg.redis_env()})
        if done.returncode != 0:
            raise UsageError(f"load-histories failed ({done.returncode}); see {self.logs / 'load-histories.log'}")
        return users, videos

    def _start_gateway(self, redis_url: str) -> GatewayProcess:
        cfg = self.cfg
        triton = ",".join(f"{cfg.host}:{replica.ports.grpc}" for replica in cfg.replicas)
        settings = {"ONEREC_REDIS_URL": redis_url, "ONEREC_TRITON_URL": triton,
                    "ONEREC_MODEL_REPO": str(cfg.repo), "ONEREC_BEAM_WIDTH": str(cfg.beam_width),
                    "ONEREC_NUM_SESSIONS": str(cfg.num_sessions), **cfg.redis_env()}
        gateway = GatewayProcess(cfg.gateway_port, settings, self.logs / "gateway.log", cfg.host, cfg.workers)
        return gateway.start(ready_timeout=cfg.timeout_s)

    # --- down -------------------------------------------------------------------------------------------

    def down(self) -> dict[str, str]:
        """Stop the gateway, every Triton replica, then Redis (each group at once); what happened to each."""
        state = StackState.read(self.cfg.state)
        if state is None:
            return {}
        result: dict[str, str] = {}
        if "gateway" in state.pids:
            result["gateway"] = stop_pid("gateway", state.pids["gateway"])
        result |= stop_together(state.pids, sorted(n for n in state.pids if n == "triton" or n.startswith("triton:")))
        workdirs = [Path(r["workdir"]) for r in state.triton_replicas] or [self.cfg.state / "triton"]
        for workdir in workdirs:  # `onerec triton` stops its server on SIGTERM; if that process was killed
            server_pid = workdir / "tritonserver.pid"  # instead, the server it started is stopped here
            if server_pid.is_file():
                name = "tritonserver" if workdir.name == "triton" else f"tritonserver:{workdir.name.split('-')[-1]}"
                leftover = stop_pid(name, int(server_pid.read_text()))
                if leftover != "not running":
                    result[name] = leftover
                server_pid.unlink()
        if "redis" in state.pids:
            result["redis"] = stop_pid("redis", state.pids["redis"])
        # a cluster's nodes all at once (each flushes its own append-only file)
        result |= stop_together(state.pids, sorted(name for name in state.pids if name.startswith("redis:")))
        StackState.path(self.cfg.state).unlink(missing_ok=True)
        for name in SERVICES:
            (self.cfg.state / f"{name}.pid").unlink(missing_ok=True)
        return result

    def running(self) -> StackState:
        state = StackState.read(self.cfg.state)
        if state is None or not any(state.alive().values()):
            raise UsageError(f"--run {self.cfg.run}: no stack running (start it with `onerec up --run {self.cfg.run}`)")
        return state

    def status(self) -> dict:
        state = StackState.read(self.cfg.state)
        if state is None:
            return {"running": False, "state_dir": str(self.cfg.state)}
        code, ready = get_json(state.gateway_url + "/readyz")
        return {"running": any(state.alive().values()), "alive": state.alive(), "ready": code == 200,
                "readyz": ready, **asdict(state)}


def ask_gateway(state: StackState, users: list[str], count: int, recent: int = 3) -> list[dict]:
    """POST /recommend for `users` (default: the first `count` loaded users), each with its `recent` latest videos."""
    from service.history import connect, history_key
    from service.settings import Settings

    prefix = Settings().history_prefix  # the gateway reads the same environment
    if not users:
        users = Path(state.users_file).read_text().split()[:count]
    client = connect(state.redis_url, state.redis_mode, timeout=2)
    answers = []
    try:
        for user in users:
            start = time.perf_counter()
            status, body = post_json(state.gateway_url + "/recommend", {"user_id": user})
            latest = [int(v) for v in client.lrange(history_key(prefix, user), 0, recent - 1)]
            answers.append({"user_id": user, "status": status, "ms": round((time.perf_counter() - start) * 1e3, 1),
                            "recent": latest, "answer": body})
    finally:
        client.close()
    return answers


def describe(answer: dict, titles: dict[int, str]) -> str:
    """One answer, readably: what the user watched last, then the five recommended videos with titles."""
    def name(video: int) -> str:
        return f"{titles.get(video, 'video')} [{video}]" if titles else f"video {video}"

    body = answer["answer"]
    lines = [f"user {answer['user_id']}: HTTP {answer['status']} in {answer['ms']:.0f} ms"]
    if answer["status"] != 200:
        lines.append(f"  error: {body}")
        return "\n".join(lines)
    if answer["recent"]:
        lines.append("  recently watched: " + "; ".join(name(v) for v in answer["recent"]))
    source = body["source"] + (f" ({body['fallback_reason']})" if body.get("fallback_reason") else "")
    lines.append(f"  recommended (source: {source}, model version {body['model_version']}):")
    lines += [f"    {item['rank']}. {name(item['video_id'])}" for item in body["items"]]
    return "\n".join(lines)


def stop_together(pids: dict[str, int], names: list[str]) -> dict[str, str]:
    """SIGTERM every process group of `names` at once, then wait for each (SIGKILL after the timeout)."""
    running = {name for name in names if pid_alive(pids[name])}
    for name in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pids[name], signal.SIGCONT)
            os.killpg(pids[name], signal.SIGTERM)
    result = {}
    for name in names:
        outcome = stop_pid(name, pids[name])
        result[name] = "stopped" if outcome == "not running" and name in running else outcome
    return result


def stop_pid(name: str, pid: int, timeout: float = EXIT_TIMEOUT_S + 15) -> str:
    """SIGTERM the process group `pid` leads, SIGKILL after `timeout`: 'stopped', 'killed' or 'not running'. A group
    whose leader is gone (SIGKILLed) but whose children are not (Triton's backend stubs) is killed: 'killed'."""
    if not pid_alive(pid):
        if kill_group_leftovers(pid):
            log.warning("%s (pid %d) had exited; killed the processes its group left behind", name, pid)
            return "killed"
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            log.info("%s (pid %d) stopped", name, pid)
            kill_group_leftovers(pid)
            return "stopped"
        time.sleep(0.1)
    log.warning("%s (pid %d) did not stop in %.0fs; killing it", name, pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return "killed"


__all__ = ["Stack", "StackConfig", "StackState", "gateway_args", "load_histories_args", "triton_args"]
