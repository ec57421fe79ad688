"""The gateway's draining HTTP protocol under a real uvicorn process: a request sent on an idle keep-alive connection
after the worker's graceful shutdown began is still answered (then the connection closes); uvicorn's stock protocol
resets it, which is how a rolling restart used to fail a /recommend."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.draining import DRAIN_S

ROOT = Path(__file__).resolve().parents[2]
APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], lifespan="off", log_level="info")
"""
REQUEST = b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(port: int, deadline_s: float = 30.0) -> socket.socket:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5.0)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def read_answer(sock: socket.socket) -> bytes:
    """One response (the tiny app's body is 2 bytes), or what came before the peer closed or reset."""
    data = b""
    try:
        while not data.endswith(b"\r\n\r\nok"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def wait_for_line(stream, text: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        line = stream.readline()
        if text in line:
            return
    raise AssertionError(f"uvicorn never logged {text!r}")


@pytest.mark.parametrize("http, answered", [("service.draining:DrainingHttpToolsProtocol", True),
                                            ("httptools", False)])
def test_a_request_on_an_idle_connection_after_shutdown_began(http: str, answered: bool) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", APP, str(port), http], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        sock = connect(port)
        sock.sendall(REQUEST)
        first = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()  # kept alive
        server.send_signal(signal.SIGTERM)
        assert server.stderr is not None
        wait_for_line(server.stderr, "Shutting down")
        time.sleep(0.2)  # the stock protocol has closed the idle connection by now; the draining one waits DRAIN_S
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the stock protocol may have reset it
            sock.sendall(REQUEST)
        second = read_answer(sock)
        if answered:
            assert second.startswith(b"HTTP/1.1 200") and b"connection: close" in second.lower(), second
            assert sock.recv(1) == b""  # and then the worker closed it
        else:
            assert second == b"", second
        sock.close()
        server.wait(timeout=DRAIN_S + 15)
        assert server.returncode == -signal.SIGTERM  # a graceful exit: uvicorn re-raises the signal it handled
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
