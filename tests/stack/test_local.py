"""`onerec up` / `onerec down` pieces without servers: state file, export check, ports, stopping, the printout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from onerec.errors import UsageError
from stack.commands import gateway_args, load_histories_args, local_command, triton_args
from stack.local import Stack, StackConfig, StackState, describe, stop_pid
from stack.probes import free_ports, pid_alive
from stack.triton import TritonPorts
from tests.conftest import run_cli


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
