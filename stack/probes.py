"""The one copy of the loopback helpers every launcher and test uses: free ports, HTTP probes, pid liveness."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import urllib.error
import urllib.request


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` right now (for tests and benchmarks that start servers)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on `host:port` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """GET `url` answers 200."""
    return get_json(url, timeout)[0] == 200


def get_json(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    """(status, JSON body) of a GET; (0, {}) when nothing answers, {} for a body that is not JSON."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL we built)
            return response.status, _json_or_empty(response.read())
    except urllib.error.HTTPError as e:
        return e.code, _json_or_empty(e.read())
    except (urllib.error.URLError, OSError):
        return 0, {}


def post_json(url: str, payload: dict, timeout: float = 30.0) -> tuple[int, dict]:
    """(status, JSON body) of a POST; (0, {"error": ...}) when nothing answers."""
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the stack's own URL)
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, _json_or_empty(e.read())
    except (urllib.error.URLError, OSError) as e:
        return 0, {"error": str(e)}


def _json_or_empty(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def kill_group_leftovers(pgid: int) -> bool:
    """SIGKILL what is left of the process group `pgid` once its leader has exited (e.g. Triton's Python backend
    stubs after a SIGKILLed tritonserver); True when something was left. Safe against pid reuse: Linux does not
    hand out a pid while a process group of that id still has members."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def pid_alive(pid: int) -> bool:
    """The process exists (a zombie child of this very process is reaped and counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    return True
