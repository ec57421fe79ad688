"""A local Redis Cluster for the stack and the tests: N masters (R replicas each) of the stack's own redis-server."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import redis

from onerec.errors import UsageError
from stack.redis_server import RedisServer, redis_binary

log = logging.getLogger(__name__)

BUS_PORT_OFFSET = 10000  # Redis Cluster's node-to-node bus listens on port + 10000


def node_ports(port: int, masters: int, replicas: int) -> list[int]:
    """The client ports of a cluster whose first node listens on `port` (masters first, then their replicas)."""
    return list(range(port, port + masters * (1 + replicas)))


class RedisCluster:
    """`masters` x (1 + `replicas`) cluster nodes on consecutive ports from `port` (their buses 10000 above), each
    with its own directory (append-only file, nodes.conf) under `workdir`; `redis-cli --cluster create` joins
    them the first time, and a restart of the same directories comes back as the same cluster.

    `node_timeout_ms` is how long a silent master takes to be declared failed (its replica then takes over):
    Redis's default is 15 s; loopback needs far less."""

    def __init__(self, workdir: Path, port: int, masters: int = 3, replicas: int = 0, host: str = "127.0.0.1",
                 node_timeout_ms: int = 2000, fsync: str = "everysec") -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        self.workdir = Path(workdir)
        self.masters = masters
        self.replicas = replicas
        self.host = host
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [RedisServer(self.workdir / f"node-{p}", p, host, fsync, node_timeout_ms)
                      for p in node_ports(port, masters, replicas)]
        self.log_path = self.workdir / "redis-cli.log"

    @property
    def url(self) -> str:
        """The seed node's URL (any node would do: the client reads the slot map from it)."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def ports(self) -> list[int]:
        """Every port the cluster listens on: the nodes' and their buses'."""
        return [node.port for node in self.nodes] + [node.port + BUS_PORT_OFFSET for node in self.nodes]

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> RedisCluster:
        """Start every node; join them into a cluster unless their nodes.conf already hold one; return once every
        node sees every slot served and every replica is in sync with its master."""
        self._check_layout()
        started: list[RedisServer] = []
        try:
            for node in self.nodes:
                started.append(node.start(timeout))
            if all(int(self._info(node).get("cluster_slots_assigned", 0)) == 0 for node in self.nodes):
                self._create()
            self.wait_ready(timeout)
        except BaseException:
            for node in reversed(started):
                node.stop()
            raise
        log.info("redis cluster ready: %d masters x %d replica(s) from %s", self.masters, self.replicas, self.url)
        return self

    def _check_layout(self) -> None:
        """`workdir/cluster.json` records the shape the nodes' nodes.conf were created with; another shape on the
        same directory would never become ready, so it is refused up front."""
        path = self.workdir / "cluster.json"
        shape = {"port": self.nodes[0].port, "masters": self.masters, "replicas": self.replicas}
        if path.is_file():
            held = json.loads(path.read_text())
            if held != shape:
                raise UsageError(f"{self.workdir} holds a Redis Cluster of {held}, not {shape}: use the same ports "
                                 "and counts, or remove that directory (its data with it)")
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(shape) + "\n")

    def _create(self) -> None:
        command = [str(redis_binary("redis-cli")), "--cluster", "create",
                   *(f"{node.host}:{node.port}" for node in self.nodes),
                   "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create exited with {done.returncode}; see {self.log_path}")

    def wait_ready(self, timeout: float = 30.0, nodes: list[RedisServer] | None = None) -> None:
        """Until every running node says cluster_state:ok and knows every node, and every replica's link to its
        master is up; RuntimeError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready(nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster not ready after {timeout:.0f}s: {self.describe()}")
            time.sleep(0.1)

    def ready(self, nodes: list[RedisServer] | None = None) -> bool:
        for node in nodes or self.nodes:
            info = self._info(node)
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
            replication = self._call(node, "INFO", "replication")
            if replication is None:
                return False
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def restart(self, timeout: float = 30.0) -> RedisCluster:
        """Stop every node and start them again on the same directories: the same cluster, its data kept."""
        self.stop()
        self.nodes = [RedisServer(n.workdir, n.port, n.host, n.fsync, n.cluster_node_timeout_ms) for n in self.nodes]
        return self.start(timeout)

    def pause(self) -> None:
        for node in self.nodes:
            node.pause()

    def resume(self) -> None:
        for node in self.nodes:
            node.resume()

    def alive(self) -> bool:
        return all(node.alive() for node in self.nodes)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- roles and faults -------------------------------------------------------------------------------

    def client(self, **kwargs) -> redis.RedisCluster:
        return redis.RedisCluster(host=self.host, port=self.nodes[0].port, **kwargs)

    def role(self, node: RedisServer) -> str | None:
        """'master' or 'slave' as the node itself says (None when it does not answer)."""
        replication = self._call(node, "INFO", "replication")
        return None if replication is None else replication.get("role")

    def master_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot now (asked of a live node: CLUSTER SLOTS)."""
        slot = self._node_client(self._live()).cluster("KEYSLOT", key)
        for start, end, master, *_ in self._node_client(self._live()).execute_command("CLUSTER SLOTS"):
            if int(start) <= int(slot) <= int(end):
                return self.node_at(int(master[1]))
        raise RuntimeError(f"slot {slot} of {key} is served by no node")

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The nodes replicating `master` now (INFO replication of each live node)."""
        out = []
        for node in self.nodes:
            replication = self._call(node, "INFO", "replication")
            if replication and replication.get("role") == "slave" and int(replication["master_port"]) == master.port:
                out.append(node)
        return out

    def node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def failover(self, replica: RedisServer, timeout: float = 15.0) -> None:
        """CLUSTER FAILOVER on `replica`: the coordinated hand-over (the master stops taking writes, the replica
        catches up, then takes its slots); returns once the replica says it is a master and the cluster is ok."""
        old = next(node for node in self.nodes if node.port == int(self._call(replica, "INFO", "replication")
                                                                     ["master_port"]))
        self._node_client(replica).execute_command("CLUSTER FAILOVER")
        self._wait_master(replica, timeout)
        deadline = time.monotonic() + timeout
        while self.role(old) != "slave" or not self.ready():  # the old master follows the new one, in sync
            if time.monotonic() > deadline:
                raise RuntimeError(f"{old.url} did not follow {replica.url} within {timeout:.0f}s: {self.describe()}")
            time.sleep(0.05)

    def kill_and_wait_takeover(self, master: RedisServer, timeout: float = 15.0) -> RedisServer:
        """SIGKILL `master`; return its replica once that replica has taken over its slots (automatic failover
        after node_timeout_ms)."""
        replicas = self.replicas_of(master)
        if not replicas:
            raise RuntimeError(f"{master.url} has no replica to take over")
        master.kill()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for replica in replicas:
                if self.role(replica) == "master":
                    return replica
            time.sleep(0.05)
        raise RuntimeError(f"no replica of {master.url} took over within {timeout:.0f}s: {self.describe()}")

    def restart_node(self, node: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Start a stopped or killed node again on its directory (a failed-over master rejoins as a replica)."""
        index = self.nodes.index(node)
        fresh = RedisServer(node.workdir, node.port, node.host, node.fsync, node.cluster_node_timeout_ms)
        self.nodes[index] = fresh.start(timeout)
        return fresh

    def _wait_master(self, node: RedisServer, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.role(node) != "master":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.url} did not become a master within {timeout:.0f}s: {self.describe()}")
            time.sleep(0.05)

    # --- plumbing -----------------------------------------------------------------------------------------

    def describe(self) -> str:
        return "; ".join(f"{node.port}: {self.role(node)} {self._info(node).get('cluster_state')}"
                         for node in self.nodes)

    def _live(self) -> RedisServer:
        for node in self.nodes:
            if node.alive() and self._call(node, "PING") is not None:
                return node
        raise RuntimeError("no cluster node answers")

    def _node_client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(host=node.host, port=node.port, socket_timeout=2, socket_connect_timeout=2,
                           decode_responses=True)

    def _info(self, node: RedisServer) -> dict:
        info = self._call(node, "CLUSTER INFO")
        return info if isinstance(info, dict) else {}

    def _call(self, node: RedisServer, *command: str):
        client = self._node_client(node)
        try:
            return client.execute_command(*command)
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()
