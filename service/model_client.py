"""The Triton model `onerec` seen from the gateway: a `tritonclient.grpc.aio` client and a breaker per replica."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from onerec.serving import layout

log = logging.getLogger(__name__)

# Shapes legend: n history items, L levels, R sessions, m items per session.

# Reconnect quickly after a Triton restart (gRPC's default backoff grows to 120 s). No keepalive pings: Triton's
# server answers pings more frequent than its min-recv-ping interval (5 min) with GOAWAY; call deadlines bound a
# dead server instead.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ModelError(Exception):
    """Triton gave no usable answer; `reason` is the fallback label (triton_unavailable, triton_timeout, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ModelAnswer:
    sessions: np.ndarray  # (R, m, L) int32 SIDs, best session first
    scores: np.ndarray  # (R,) float32
    model_version: str  # the version Triton answered with


@dataclass(frozen=True)
class ServedModel:
    """What Triton serves, from the model config's `parameters`: the primary version and its catalog hash, and
    the canary (a second loaded version) with its catalog hash and share of users."""

    version: str
    catalog_hash: str
    bans_in_beam: bool = False  # its config declares the optional BANNED_SIDS input (exported since issue 15)
    canary_version: str | None = None  # None: every user on `version`
    canary_catalog_hash: str = ""
    canary_share: float = 0.0


class CircuitBreaker:
    """closed -> (N consecutive failures) -> open -> (after reset_s) half-open: one probe -> closed or open again."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.reset_s, self.clock = failures, reset_s, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.reset_s else "open"

    def available(self) -> bool:
        """Would `allow` let a call through now (without taking the half-open probe)?"""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.probing)

    def allow(self) -> bool:
        """May a call go out now? In half-open state only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.consecutive, self.opened_at, self.probing = 0, None, False

    def release(self) -> None:
        """The call ended with neither answer nor failure (cancelled): another probe may go out."""
        self.probing = False

    def failure(self) -> None:
        self.consecutive += 1
        if self.probing or self.consecutive >= self.failures:
            self.opened_at = self.clock()
        self.probing = False


def failure_reason(exc: InferenceServerException) -> str:
    """Map a Triton/gRPC error to a fallback reason."""
    status, message = str(exc.status() or ""), (exc.message() or "").lower()
    if "DEADLINE_EXCEEDED" in status or "deadline" in message:
        return "triton_timeout"
    if "queue" in message or "RESOURCE_EXHAUSTED" in status:
        return "triton_overloaded"
    if "version" in message and ("not ready" in message or "unknown" in message or "not found" in message):
        return "version_unavailable"  # Triton is up but no longer holds the pinned version (a rollout moved on)
    if "UNAVAILABLE" in status or "connect" in message or "CANCELLED" in status:
        return "triton_unavailable"
    return "triton_error"


RETRIED = frozenset({"triton_unavailable", "triton_timeout", "triton_overloaded", "version_unavailable"})
ANSWERED = frozenset({"triton_error", "version_unavailable"})  # Triton answered: alive, not a breaker failure

# Requests go round robin over the replicas with at most this many more requests in flight than the least busy:
# an even split under light load (pure least-in-flight would split by speed), and a slow or hung replica's pile
# of calls, more than one above the others, keeps further requests away from it.
IN_FLIGHT_SLACK = 1

Resolver = Callable[[str], Awaitable[list[str]]]
ClientFactory = Callable[[str], Any]


def split_target(target: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for an IPv6 literal) -> (host, port); ValueError otherwise."""
    host, sep, port = target.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in " ,/"):
        raise ValueError(f"{target!r} is not host:port")
    return host, int(port)


def join_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(target: str) -> list[str]:
    """Every address `target` (host:port) resolves to, as host:port: an IP literal is itself, a name (a
    Kubernetes headless Service's) gives one per record; IPv4 records only when there are any."""
    host, port = split_target(target)
    try:
        ipaddress.ip_address(host)
        return [join_target(host, port)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
    v6 = [info[4][0] for info in infos if info[0] == socket.AF_INET6]
    return [join_target(address, port) for address in dict.fromkeys(v4 or v6)]


def _client(address: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(address, channel_args=CHANNEL_ARGS)


class Replica:
    """One Triton endpoint: its own gRPC client and circuit breaker, the requests in flight to it, and what it
    served at the last refresh."""

    def __init__(self, address: str, client: Any, breaker: CircuitBreaker) -> None:
        self.address = address
        self.client = client
        self.breaker = breaker
        self.in_flight = 0
        self.served: ServedModel | None = None  # None: not serving (or not asked yet)
        self.versions: frozenset[str] | None = None  # the model's READY versions here; None: unknown
        self.reason = "triton_unavailable"  # why `served` is None: a fallback reason, and in words
        self.problem = "not asked yet"

    def holds(self, version: str) -> int:
        """0: known to serve `version` ("" = any), 1: unknown, 2: known not to (try it last)."""
        if self.versions is None:
            return 1
        if not version:
            return 0 if self.served is not None else 2
        return 0 if version in self.versions else 2


class TritonModel:
    """The model on one or several Triton replicas (a list of host:port, names resolved to every address).

    Each request goes to one replica chosen per request: among those whose breaker lets calls through, the ones
    known to hold the requested version, then in turn among those with at most IN_FLIGHT_SLACK more requests in
    flight than the least busy. A failure
    that another replica may not have (unavailable, timeout, overloaded, version not held) is retried on another,
    each replica at most once, up to `attempts`; inference only reads, so a retry is safe."""

    def __init__(self, targets: str | list[str], model_name: str, timeout: float, beam_width: int,
                 num_sessions: int, breaker: Callable[[], CircuitBreaker] | None = None, attempts: int = 3,
                 resolver: Resolver = resolve, client: ClientFactory = _client) -> None:
        self.targets = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else targets
        if not self.targets:
            raise ValueError("no Triton endpoint given")
        self.model_name = model_name
        self.timeout = timeout
        self.beam_width = beam_width
        self.num_sessions = num_sessions
        self.new_breaker = breaker or (lambda: CircuitBreaker(3, 1.0))
        self.attempts = attempts
        self.resolver = resolver
        self.new_client = client
        # Until the first refresh resolves the names, one replica per target as given (gRPC resolves it).
        self.replicas: dict[str, Replica] = {t: self._replica(t) for t in dict.fromkeys(self.targets)}
        self.retired: list[Replica] = []  # gone from DNS: closed once nothing is in flight on them
        self.chosen: ServedModel | None = None
        self._turn = 0

    def _replica(self, address: str) -> Replica:
        return Replica(address, self.new_client(address), self.new_breaker())

    @property
    def circuit_open(self) -> bool:
        """No replica lets a call through now."""
        return not any(replica.breaker.available() for replica in self.replicas.values())

    # --- inference ----------------------------------------------------------------------------------------

    async def infer(self, history_sids: np.ndarray, exclude_history: bool, request_id: str = "",
                    banned_sids: np.ndarray | None = None, version: str = "") -> ModelAnswer:
        """Generate sessions for one history (n, L) with model `version` (the one whose catalog maps the answer;
        "" = Triton's choice), never holding a SID of `banned_sids` (k, L); ModelError(reason) on any failure."""
        inputs = _inputs(history_sids, self.beam_width, self.num_sessions, exclude_history, banned_sids)
        tried: set[str] = set()
        errors: list[ModelError] = []
        while len(tried) < self.attempts:
            replica = self._pick(version, tried)
            if replica is None:
                break
            tried.add(replica.address)
            replica.in_flight += 1
            try:
                result = await replica.client.infer(self.model_name, inputs, model_version=version,
                                                    request_id=request_id, client_timeout=self.timeout)
            except InferenceServerException as e:
                reason = failure_reason(e)
                if reason in ANSWERED:
                    replica.breaker.success()
                else:
                    replica.breaker.failure()
                if reason == "version_unavailable" and version and replica.versions is not None:
                    replica.versions = replica.versions - {version}  # until the next refresh says otherwise
                errors.append(ModelError(reason, f"triton {replica.address}: {e.message()}"))
                if reason not in RETRIED:
                    break
                log.info("triton %s: %s; trying another replica", replica.address, reason)
                continue
            except BaseException:  # cancelled (the caller went away): no verdict on the replica
                replica.breaker.release()
                raise
            finally:
                replica.in_flight -= 1
            replica.breaker.success()
            response = result.get_response()
            sessions = result.as_numpy(layout.OUT_SESSIONS)[0]  # (R, m, L)
            scores = result.as_numpy(layout.OUT_SCORES)[0]  # (R,)
            return ModelAnswer(sessions, scores, str(response.model_version))
        if not errors:
            raise ModelError("circuit_open", "circuit open on every Triton replica after repeated failures")
        # version_unavailable first: the gateway re-syncs on it (a rollout moved on)
        raise next((e for e in errors if e.reason == "version_unavailable"), errors[-1])

    def _pick(self, version: str, tried: set[str]) -> Replica | None:
        candidates = [r for r in self.replicas.values() if r.address not in tried and r.breaker.available()]
        if not candidates:
            return None
        best = min(r.holds(version) for r in candidates)
        candidates = [r for r in candidates if r.holds(version) == best]
        fewest = min(r.in_flight for r in candidates)
        candidates = [r for r in candidates if r.in_flight <= fewest + IN_FLIGHT_SLACK]
        self._turn += 1
        chosen = candidates[self._turn % len(candidates)]
        chosen.breaker.allow()  # available() held: closed, or the half-open breaker's one probe
        return chosen

    # --- what the replicas serve ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Resolve the targets again (replicas appear and leave with DNS) and ask each replica what it serves."""
        addresses = await self._resolve()
        if addresses and set(addresses) != set(self.replicas):
            for gone in set(self.replicas) - set(addresses):
                log.info("triton replica %s left", gone)
                self.retired.append(self.replicas.pop(gone))
            for new in addresses:
                if new not in self.replicas:
                    log.info("triton replica %s joined", new)
                    self.replicas[new] = self._replica(new)
        await asyncio.gather(*(self._ask(replica) for replica in self.replicas.values()))
        idle = [replica for replica in self.retired if replica.in_flight == 0]
        self.retired = [replica for replica in self.retired if replica.in_flight > 0]
        await asyncio.gather(*(replica.client.close() for replica in idle), return_exceptions=True)

    async def _resolve(self) -> list[str] | None:
        """Every target's addresses; None (keep the replicas as they are) when a name does not resolve."""
        try:
            found = await asyncio.wait_for(asyncio.gather(*(self.resolver(t) for t in self.targets)),
                                           self.timeout)
        except (TimeoutError, OSError, ValueError) as e:
            log.warning("triton endpoints %s: %s; keeping %s", ",".join(self.targets), e or type(e).__name__,
                        ",".join(self.replicas))
            return None
        return list(dict.fromkeys(address for addresses in found for address in addresses)) or None

    async def _ask(self, replica: Replica) -> None:
        """Read one replica's model config and READY versions into `served`, `versions` and `problem`."""
        try:
            config = (await replica.client.get_model_config(self.model_name, client_timeout=self.timeout)).config
            index = await replica.client.get_model_repository_index(client_timeout=self.timeout)
        except InferenceServerException as e:
            replica.served, replica.versions = None, None
            replica.reason, replica.problem = failure_reason(e), f"triton: {e.message()}"
            return
        replica.versions = frozenset(str(m.version) for m in index.models
                                     if m.name == self.model_name and m.state == "READY")
        try:
            replica.served = self._view(config, replica.versions)
            replica.reason = replica.problem = ""
        except ModelError as e:
            replica.served, replica.reason, replica.problem = None, e.reason, str(e)

    def _view(self, config: Any, versions: frozenset[str]) -> ServedModel:
        """The served model one replica's config describes (its `parameters`), given its READY versions;
        ModelError when the config says nothing of versions or its primary is not ready there."""
        params = {key: value.string_value for key, value in config.parameters.items()}
        if layout.PARAM_VERSION not in params or layout.PARAM_CATALOG_HASH not in params:
            raise ModelError("catalog_mismatch", "model config has no model_version/catalog_hash parameters")
        version = params[layout.PARAM_VERSION]
        if version not in versions:
            raise ModelError("triton_unavailable", f"model {self.model_name} version {version} is not ready")
        canary = params.get(layout.PARAM_CANARY_VERSION) or None
        try:
            share = float(params.get(layout.PARAM_CANARY_SHARE) or 0.0)
        except ValueError:
            share = 0.0
        if canary is not None and not (0.0 < share <= 1.0 and canary != version and canary in versions):
            canary = None  # no share, or not loaded (yet): every user on the primary
        return ServedModel(version, params.get(layout.catalog_hash_param(version), params[layout.PARAM_CATALOG_HASH]),
                           bans_in_beam=any(tensor.name == layout.IN_BANNED for tensor in config.input),
                           canary_version=canary,
                           canary_catalog_hash=params.get(layout.catalog_hash_param(canary), "") if canary else "",
                           canary_share=share if canary else 0.0)

    async def served(self) -> ServedModel:
        """What the gateway pins, agreed across the replicas (refreshed first); ModelError when none serves.

        Replicas disagree during a rollout (each loads in turn). Of the views the serving replicas report, the
        one whose primary the most replicas hold wins, then the one whose versions (primary and canary) the most
        hold, then the one the most report, then the one already pinned: a new primary is followed once it is the
        one every replica can answer, and until then requests keep the version they can get everywhere."""
        await self.refresh()
        serving = [replica for replica in self.replicas.values() if replica.served is not None]
        if not serving:
            problems = "; ".join(f"{r.address}: {r.problem}" for r in self.replicas.values())
            reasons = [r.reason for r in self.replicas.values()]
            reason = "catalog_mismatch" if "catalog_mismatch" in reasons else reasons[0] or "triton_unavailable"
            raise ModelError(reason, f"no Triton replica serves {self.model_name} ({problems})")
        views = [replica.served for replica in serving if replica.served is not None]

        def holding(versions: set[str]) -> int:
            return sum(1 for r in serving if r.versions is not None and versions <= r.versions)

        def rank(view: ServedModel) -> tuple[int, int, int, bool]:
            every = {view.version} | ({view.canary_version} if view.canary_version else set())
            return holding({view.version}), holding(every), views.count(view), view == self.chosen

        self.chosen = max(dict.fromkeys(views), key=rank)
        return self.chosen

    async def ready(self) -> bool:
        """At least one replica has the model ready."""
        async def one(replica: Replica) -> bool:
            try:
                return bool(await replica.client.is_model_ready(self.model_name, client_timeout=self.timeout))
            except InferenceServerException:
                return False

        return any(await asyncio.gather(*(one(replica) for replica in self.replicas.values())))

    async def close(self) -> None:
        replicas = [*self.replicas.values(), *self.retired]
        await asyncio.gather(*(replica.client.close() for replica in replicas), return_exceptions=True)


def _inputs(history_sids: np.ndarray, beam_width: int, num_sessions: int, exclude_history: bool,
            banned_sids: np.ndarray | None = None) -> list[grpcclient.InferInput]:
    history = np.ascontiguousarray(history_sids, dtype=np.int32)[None]  # (1, n, L)
    tensors = [
        (layout.IN_HISTORY, history, "INT32"),
        (layout.IN_BEAM_WIDTH, np.array([[beam_width]], dtype=np.int32), "INT32"),
        (layout.IN_NUM_SESSIONS, np.array([[num_sessions]], dtype=np.int32), "INT32"),
        (layout.IN_EXCLUDE, np.array([[exclude_history]], dtype=bool), "BOOL"),
    ]
    if banned_sids is not None and len(banned_sids):  # optional: left out, the request is what it always was
        tensors.append((layout.IN_BANNED, np.ascontiguousarray(banned_sids, dtype=np.int32)[None], "INT32"))
    inputs = []
    for name, array, dtype in tensors:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
