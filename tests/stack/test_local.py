"""`onerec up` / `onerec down` pieces without servers (state file, export check, ports, stopping, the printout), and
the local Redis Cluster of `onerec up --redis-cluster` started and loaded for real."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from onerec.errors import UsageError
from stack.commands import gateway_args, load_histories_args, local_command, triton_args
from stack.local import Stack, StackConfig, StackState, describe, stop_pid
from stack.probes import free_ports, pid_alive
from stack.triton import TritonPorts
from tests.conftest import run_cli
from tests.redis_backends import cluster_port


def state(tmp_path: Path) -> StackState:
    return StackState(run="r", model_repo="m", gateway_url="http://127.0.0.1:1", redis_url="redis://x",
                      triton_http_url="h", triton_grpc_url="g", triton_metrics_url="mu", pids={"redis": 1},
                      logs={}, users_file=str(tmp_path / "users.txt"), videos_file="v", model_version="3")


def test_state_round_trip_and_corrupt_file(tmp_path):
    state(tmp_path).write(tmp_path)
    assert StackState.read(tmp_path) == state(tmp_path)
    assert StackState.read(tmp_path / "missing") is None
    (tmp_path / "stack.json").write_text("{not json")
    with pytest.raises(UsageError, match="stack.json: not a stack state file"):
        StackState.read(tmp_path)


def test_commands_are_the_onerec_cli_run_by_this_interpreter():
    assert triton_args("/models", "0.0.0.0", "/work", TritonPorts(1, 2, 3)) == [
        "onerec", "triton", "--model-repo", "/models", "--host", "0.0.0.0", "--workdir", "/work",
        "--http-port", "1", "--grpc-port", "2", "--metrics-port", "3"]
    assert gateway_args("0.0.0.0", 8080) == ["onerec", "serve", "--host", "0.0.0.0", "--port", "8080",
                                             "--workers", "1"]
    assert load_histories_args("/run", "redis://redis:6379/0")[1:] == [
        "load-histories", "--run", "/run", "--redis-url", "redis://redis:6379/0"]
    assert local_command(gateway_args("h", 1))[:3] == [sys.executable, "-m", "cli"]


def test_ports_in_use_or_repeated_are_refused(tmp_path):
    gateway, redis_port, *triton = free_ports(5)
    cfg = StackConfig(run=tmp_path, gateway_port=gateway, redis_port=redis_port, triton_ports=TritonPorts(*triton))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", redis_port))
        busy.listen()
        with pytest.raises(UsageError, match=f"--redis-port {redis_port}"):
            Stack(cfg)._check_ports()
    same = StackConfig(run=tmp_path, gateway_port=gateway, redis_port=gateway, triton_ports=TritonPorts(*triton))
    with pytest.raises(UsageError, match="ports must differ"):
        Stack(same)._check_ports()


def test_stop_pid_terminates_then_kills():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    assert pid_alive(polite.pid)
    assert stop_pid("polite", polite.pid, timeout=10) == "stopped"
    assert not pid_alive(polite.pid)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time, sys\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\n"
                                 "time.sleep(60)"], start_new_session=True, stdout=subprocess.PIPE)
    assert stubborn.stdout.readline() == b"ready\n"
    assert stop_pid("stubborn", stubborn.pid, timeout=0.5) == "killed"
    stubborn.wait(5)
    assert stop_pid("gone", stubborn.pid) == "not running"


def test_describe_prints_titles_and_the_fallback_reason():
    answer = {"user_id": "7", "status": 200, "ms": 12.3, "recent": [2],
              "answer": {"source": "popular", "fallback_reason": "cold_start", "model_version": "1",
                         "items": [{"rank": i + 1, "video_id": v} for i, v in enumerate([1, 2, 3, 4, 5])]}}
    assert describe(answer, {1: "Toy Story (1995)", 2: "GoldenEye (1995)"}) == "\n".join([
        "user 7: HTTP 200 in 12 ms",
        "  recently watched: GoldenEye (1995) [2]",
        "  recommended (source: popular (cold_start), model version 1):",
        "    1. Toy Story (1995) [1]", "    2. GoldenEye (1995) [2]", "    3. video [3]", "    4. video [4]",
        "    5. video [5]"])
    assert describe({**answer, "status": 0, "answer": {"error": "refused"}}, {}).endswith("error: {'error': 'refused'}")


def test_cli_without_a_running_stack(tmp_path):
    assert run_cli("down", "--run", tmp_path)[:2] == (0, "nothing running\n")
    code, _, err = run_cli("recommend", "--run", tmp_path)
    assert code == 2 and "no stack running" in err
    code, out, _ = run_cli("status", "--run", tmp_path, "--json")
    assert code == 0 and json.loads(out)["running"] is False


# --- `onerec up --redis-cluster N [--redis-replicas R]` ----------------------------------------------------------


def test_an_old_state_file_reads_as_standalone(tmp_path):
    fields = {k: v for k, v in asdict(state(tmp_path)).items() if k not in ("redis_mode", "redis_urls")}
    (tmp_path / "stack.json").write_text(json.dumps(fields))
    read = StackState.read(tmp_path)
    assert read is not None and read.redis_mode == "standalone" and read.redis_urls == []


def test_cluster_settings_for_the_gateway_and_load_histories(tmp_path):
    assert StackConfig(run=tmp_path).redis_env() == {"ONEREC_REDIS_MODE": "standalone"}
    assert StackConfig(run=tmp_path, redis_cluster=3).redis_env() == {"ONEREC_REDIS_MODE": "cluster"}
    assert StackConfig(run=tmp_path, redis_cluster=3, redis_replicas=2).redis_env() == {
        "ONEREC_REDIS_MODE": "cluster", "ONEREC_REDIS_WAIT_REPLICAS": "1"}


def test_cluster_ports_in_use_or_clashing_are_refused(tmp_path):
    base = cluster_port(6)
    cluster = {base + i + bus for i in range(6) for bus in (0, 10000)}  # the nodes' ports and their buses
    gateway, *triton = next(ports for ports in (free_ports(4) for _ in range(50)) if not cluster & set(ports))
    cfg = StackConfig(run=tmp_path, gateway_port=gateway, redis_port=base, redis_cluster=3, redis_replicas=1,
                      triton_ports=TritonPorts(*triton))
    Stack(cfg)._check_ports()  # all free
    for busy_port, shown in ((base + 4, f"--redis-port {base} (port {base + 4})"),
                             (base + 10002, f"(port {base + 10002})")):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", busy_port))
            busy.listen()
            with pytest.raises(UsageError, match=re.escape(shown)):
                Stack(cfg)._check_ports()
    clash = StackConfig(run=tmp_path, gateway_port=base + 2, redis_port=base, redis_cluster=3,
                        triton_ports=TritonPorts(*triton))
    with pytest.raises(UsageError, match=r"clash with \[" + str(base + 2)):
        Stack(clash)._check_ports()


@pytest.mark.parametrize(("args", "needle"), [
    (["--redis-cluster", "2"], "--redis-cluster: a Redis Cluster needs at least 3 masters"),
    (["--redis-replicas", "1"], "needs --redis-cluster"),
    (["--redis-cluster", "3", "--redis-replicas", "-1"], "--redis-replicas -1: must be >= 0"),
])
def test_up_refuses_a_cluster_that_cannot_be(tmp_path, args, needle):
    code, _, err = run_cli("up", "--run", tmp_path, *args)
    assert code == 2 and needle in err


def test_down_stops_every_cluster_node(tmp_path):
    sleepers = {name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
                for name in ("redis:7001", "redis:7002", "redis:7003", "gateway")}
    cluster_state = state(tmp_path)
    cluster_state.pids = {name: p.pid for name, p in sleepers.items()}
    cluster_state.redis_mode = "cluster"
    cluster_state.write(tmp_path)
    stopped = Stack(StackConfig(run=tmp_path, state_dir=tmp_path)).down()
    assert list(stopped) == ["gateway", "redis:7001", "redis:7002", "redis:7003"]  # the gateway first
    assert set(stopped.values()) == {"stopped"}
    for process in sleepers.values():
        process.wait(5)
    assert StackState.read(tmp_path) is None


@pytest.mark.integration
def test_the_stack_starts_a_cluster_and_loads_the_histories_into_it(tmp_path, tiny_run):
    """What `onerec up --redis-cluster 3 --redis-replicas 1` does before Triton: six nodes from the stack's own
    redis-server, joined into 3 masters with a replica each, and load-histories writing into them in cluster mode;
    a second start on the same directory is the same cluster with its data, another shape is refused."""
    from service.history import connect, history_key
    from stack.redis_cluster import RedisCluster

    cfg = StackConfig(run=tiny_run, state_dir=tmp_path / "stack", redis_port=cluster_port(6), redis_cluster=3,
                      redis_replicas=1)
    stack = Stack(cfg)
    stack.logs.mkdir(parents=True)
    cluster = stack._start_redis()
    try:
        assert isinstance(cluster, RedisCluster) and len(cluster.nodes) == 6
        assert sorted(cluster.role(node) for node in cluster.nodes) == ["master"] * 3 + ["slave"] * 3
        users, _ = stack._load_histories(cluster.url)
        loaded = users.read_text().split()
        client = connect(cluster.url, "cluster", timeout=5)
        assert all(client.llen(history_key("onerec:history:", user)) > 0 for user in loaded)
        assert {cluster.master_of(history_key("onerec:history:", u)).port for u in loaded} == {
            node.port for node in cluster.nodes if cluster.role(node) == "master"}
        cluster.restart()
        assert connect(cluster.url, "cluster", timeout=5).llen(history_key("onerec:history:", loaded[0])) > 0
    finally:
        cluster.stop()
    with pytest.raises(UsageError, match="holds a Redis Cluster of"):
        Stack(StackConfig(run=tiny_run, state_dir=tmp_path / "stack", redis_port=cfg.redis_port, redis_cluster=4,
                          ))._start_redis()


# --- `onerec up --triton-replicas N` ------------------------------------------------------------------------------


def test_replicas_take_ports_ten_apart_and_their_own_work_directories(tmp_path):
    cfg = StackConfig(run=tmp_path, triton_ports=TritonPorts(8000, 8001, 8002), triton_replicas=3)
    assert [(r.name, r.ports, r.workdir.name, r.log_name) for r in cfg.replicas] == [
        ("triton", TritonPorts(8000, 8001, 8002), "triton", "triton.log"),
        ("triton:1", TritonPorts(8010, 8011, 8012), "triton-1", "triton-1.log"),
        ("triton:2", TritonPorts(8020, 8021, 8022), "triton-2", "triton-2.log")]
    assert StackConfig(run=tmp_path).replicas[0].urls("127.0.0.1") == {
        "http_url": "http://127.0.0.1:8000", "grpc_url": "127.0.0.1:8001", "metrics_url": "http://127.0.0.1:8002/metrics"}


def test_replica_ports_in_use_or_clashing_are_refused(tmp_path):
    gateway, redis_port = free_ports(2)
    base = cluster_port(13)  # a free block: base .. base + 12
    cfg = StackConfig(run=tmp_path, gateway_port=gateway, redis_port=redis_port,
                      triton_ports=TritonPorts(base, base + 1, base + 2), triton_replicas=2)
    Stack(cfg)._check_ports()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 11))
        busy.listen()
        with pytest.raises(UsageError, match=re.escape(f"--triton-grpc-port (replica 1: +10) {base + 11}")):
            Stack(cfg)._check_ports()
    clash = StackConfig(run=tmp_path, gateway_port=gateway, redis_port=redis_port,
                        triton_ports=TritonPorts(base, base + 10, base + 2), triton_replicas=2)
    with pytest.raises(UsageError, match="ports must differ"):
        Stack(clash)._check_ports()


def test_up_refuses_no_replica(tmp_path):
    code, _, err = run_cli("up", "--run", tmp_path, "--triton-replicas", "0")
    assert code == 2 and "--triton-replicas: at least 1" in err


def test_an_old_state_file_reaches_its_one_triton(tmp_path):
    fields = {k: v for k, v in asdict(state(tmp_path)).items() if k not in ("triton_replicas", "prometheus_config")}
    (tmp_path / "stack.json").write_text(json.dumps(fields))
    read = StackState.read(tmp_path)
    assert read is not None and read.triton_replicas == [] and read.triton_http_urls == ["h"]


def test_rollout_commands_reach_every_replica_of_the_stack(tmp_path):
    from cli.rollout import resolve_target

    two = state(tmp_path)
    two.model_repo = str(tmp_path)
    two.triton_replicas = [{"name": "triton", "http_url": "http://127.0.0.1:8000"},
                           {"name": "triton:1", "http_url": "http://127.0.0.1:8010"}]
    two.write(tmp_path)
    target = resolve_target(tmp_path, None, None, tmp_path)
    assert target.triton_url == "http://127.0.0.1:8000,http://127.0.0.1:8010"
    assert resolve_target(tmp_path, None, "h:1", tmp_path).triton_url == "h:1"  # the flag first


def test_down_stops_every_replica_and_a_server_left_behind(tmp_path):
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    sleepers = {name: subprocess.Popen(sleep, start_new_session=True) for name in ("gateway", "triton", "triton:1",
                                                                                  "redis")}
    orphan = subprocess.Popen(sleep, start_new_session=True)  # replica 1's tritonserver, its `onerec triton` killed
    (tmp_path / "triton-1").mkdir()
    (tmp_path / "triton-1" / "tritonserver.pid").write_text(f"{orphan.pid}\n")
    two = state(tmp_path)
    two.pids = {name: p.pid for name, p in sleepers.items()}
    two.triton_replicas = [{"name": "triton", "workdir": str(tmp_path / "triton")},
                           {"name": "triton:1", "workdir": str(tmp_path / "triton-1")}]
    two.write(tmp_path)
    stopped = Stack(StackConfig(run=tmp_path, state_dir=tmp_path)).down()
    assert list(stopped) == ["gateway", "triton", "triton:1", "tritonserver:1", "redis"]
    assert set(stopped.values()) == {"stopped"}
    for process in [*sleepers.values(), orphan]:
        process.wait(5)
    assert not (tmp_path / "triton-1" / "tritonserver.pid").exists()


def leader_with_child() -> tuple[subprocess.Popen, int]:
    """A process-group leader (own session) with a child in its group: a tritonserver and its backend stub."""
    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)")
    leader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    return leader, int(leader.stdout.readline())


def test_a_sigkilled_leaders_group_is_killed_not_left_running(tmp_path):
    import os
    import signal

    from stack.child import ChildProcess

    leader, child = leader_with_child()
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait(5)
    assert pid_alive(child)  # the leader's death alone leaves the stub running (what CI saw)
    assert stop_pid("tritonserver:1", leader.pid) == "killed"
    wait_gone(child)
    assert stop_pid("tritonserver:1", leader.pid) == "not running"  # nothing left: nothing killed
    launcher = ChildProcess()  # the launcher's own stop (`onerec triton`), after its server died
    launcher.log_path = tmp_path / "log"
    launcher.process, child = leader_with_child()
    os.kill(launcher.process.pid, signal.SIGKILL)
    launcher.process.wait(5)
    assert launcher.stop() == -signal.SIGKILL
    wait_gone(child)


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still running"
        time.sleep(0.05)


def test_the_stacks_scrape_config_names_every_replica(tmp_path):
    import yaml

    cfg = StackConfig(run=tmp_path, state_dir=tmp_path, triton_replicas=2)
    replicas = [{**r.urls("127.0.0.1")} for r in cfg.replicas]
    path = Stack(cfg)._write_scrape_config("http://127.0.0.1:8080", replicas)
    jobs = {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}
    assert jobs["triton"]["static_configs"] == [{"targets": ["127.0.0.1:8002", "127.0.0.1:8012"]}]
    assert jobs["gateway"]["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]
