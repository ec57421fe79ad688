"""The Triton model `onerec` seen from the gateway: one `tritonclient.grpc.aio` client and a circuit breaker."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from onerec.serving import layout

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


class TritonModel:
    """Calls `onerec` with a deadline; failures that mean "Triton is not there" feed the circuit breaker."""

    def __init__(self, url: str, model_name: str, timeout: float, beam_width: int, num_sessions: int,
                 breaker: CircuitBreaker) -> None:
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.model_name, self.timeout = model_name, timeout
        self.beam_width, self.num_sessions, self.breaker = beam_width, num_sessions, breaker

    async def infer(self, history_sids: np.ndarray, exclude_history: bool, request_id: str = "",
                    banned_sids: np.ndarray | None = None, version: str = "") -> ModelAnswer:
        """Generate sessions for one history (n, L) with model `version` (the one whose catalog maps the answer;
        "" = Triton's choice), never holding a SID of `banned_sids` (k, L); ModelError(reason) on any failure."""
        if not self.breaker.allow():
            raise ModelError("circuit_open", "circuit open after repeated Triton failures")
        inputs = _inputs(history_sids, self.beam_width, self.num_sessions, exclude_history, banned_sids)
        try:
            result = await self.client.infer(self.model_name, inputs, model_version=version, request_id=request_id,
                                             client_timeout=self.timeout)
        except InferenceServerException as e:
            reason = failure_reason(e)
            if reason in ("triton_error", "version_unavailable"):  # Triton answered: alive, not a breaker failure
                self.breaker.success()
            else:
                self.breaker.failure()
            raise ModelError(reason, f"triton: {e.message()}") from e
        self.breaker.success()
        response = result.get_response()
        sessions = result.as_numpy(layout.OUT_SESSIONS)[0]  # (R, m, L)
        scores = result.as_numpy(layout.OUT_SCORES)[0]  # (R,)
        return ModelAnswer(sessions, scores, str(response.model_version))

    async def served(self) -> ServedModel:
        """The served version and catalog hash (model config `parameters`); ModelError if not ready."""
        try:
            config = (await self.client.get_model_config(self.model_name, client_timeout=self.timeout)).config
            primary = config.parameters[layout.PARAM_VERSION].string_value \
                if layout.PARAM_VERSION in config.parameters else ""
            ready = await self.client.is_model_ready(self.model_name, primary, client_timeout=self.timeout)
            if not ready:
                raise ModelError("triton_unavailable", f"model {self.model_name} version {primary} is not ready")
        except InferenceServerException as e:
            raise ModelError(failure_reason(e), f"triton: {e.message()}") from e
        params = {key: value.string_value for key, value in config.parameters.items()}
        if layout.PARAM_VERSION not in params or layout.PARAM_CATALOG_HASH not in params:
            raise ModelError("catalog_mismatch", "model config has no model_version/catalog_hash parameters")
        version = params[layout.PARAM_VERSION]
        canary = params.get(layout.PARAM_CANARY_VERSION) or None
        try:
            share = float(params.get(layout.PARAM_CANARY_SHARE) or 0.0)
        except ValueError:
            share = 0.0
        if canary is not None and not (0.0 < share <= 1.0 and canary != version
                                       and await self._version_ready(canary)):
            canary = None  # no share, or not loaded (yet): every user on the primary
        return ServedModel(version, params.get(layout.catalog_hash_param(version), params[layout.PARAM_CATALOG_HASH]),
                           bans_in_beam=any(tensor.name == layout.IN_BANNED for tensor in config.input),
                           canary_version=canary,
                           canary_catalog_hash=params.get(layout.catalog_hash_param(canary), "") if canary else "",
                           canary_share=share if canary else 0.0)

    async def _version_ready(self, version: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model_name, version, client_timeout=self.timeout))
        except InferenceServerException:
            return False

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model_name, client_timeout=self.timeout))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self.client.close()


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
