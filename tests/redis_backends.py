"""The two Redis deployments the gateway supports, as one test interface: a redis-server, or a local Redis Cluster."""

from __future__ import annotations

from pathlib import Path

import redis

from service.history import connect
from stack.probes import free_ports, port_free
from stack.redis_cluster import BUS_PORT_OFFSET, RedisCluster
from stack.redis_server import RedisServer

MODES = ("standalone", "cluster")


def cluster_port(nodes: int) -> int:
    """A first port with `nodes` consecutive free ports and their cluster-bus ports (10000 above) free too."""
    for _ in range(50):
        (base,) = free_ports(1)
        if base + nodes + BUS_PORT_OFFSET >= 65536:
            continue
        wanted = [base + i for i in range(nodes)] + [base + i + BUS_PORT_OFFSET for i in range(nodes)]
        if all(port_free("127.0.0.1", p) for p in wanted):
            return base
    raise RuntimeError("no free range of ports for a local Redis Cluster")


class RedisBackend:
    """`mode` "standalone" (one redis-server) or "cluster" (3 masters, `replicas` each); same methods either way."""

    def __init__(self, mode: str, workdir: Path, replicas: int = 0, node_timeout_ms: int = 5000) -> None:
        self.mode = mode
        if mode == "cluster":
            self.server: RedisServer | RedisCluster = RedisCluster(
                workdir, cluster_port(3 * (1 + replicas)), 3, replicas, node_timeout_ms=node_timeout_ms)
        else:
            self.server = RedisServer(workdir, free_ports(1)[0])

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> RedisBackend:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> RedisBackend:
        """Start again on the same port(s) and data directory (a stopped server, or every node of the cluster)."""
        if isinstance(self.server, RedisCluster):
            self.server.restart()
        else:
            self.server = RedisServer(self.server.workdir, self.server.port).start()
        return self

    def pause(self) -> None:
        self.server.pause()

    def resume(self) -> None:
        self.server.resume()

    def client(self) -> redis.Redis | redis.RedisCluster:
        """A blocking client of the right kind (bytes replies)."""
        return connect(self.url, self.mode, timeout=5)

    def gateway_env(self) -> dict[str, str]:
        return {"ONEREC_REDIS_URL": self.url, "ONEREC_REDIS_MODE": self.mode}

    def __enter__(self) -> RedisBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
