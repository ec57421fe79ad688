"""Circuit breaker states on a fake clock, the Triton error -> fallback reason mapping, and the replicas: per-request
balancing, retries on another replica, per-replica breakers, the pinned version when replicas disagree, DNS."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service.model_client import CircuitBreaker, ModelError, TritonModel, failure_reason, resolve, split_target
from service.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_failures_then_probes_once():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, reset_s=2.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state == "half_open"
    assert breaker.allow()  # the one probe
    assert not breaker.allow()  # no second while it is out
    breaker.failure()  # probe failed: open again, for another reset_s
    assert breaker.state == "open"
    clock.now += 2.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_success_resets_the_failure_count():
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state == "closed"


@pytest.mark.parametrize(("status", "message", "reason"), [
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", "triton_timeout"),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", "triton_unavailable"),
    ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", "triton_overloaded"),
    ("StatusCode.UNAVAILABLE", "Request timeout expired (queue)", "triton_overloaded"),
    ("StatusCode.INVALID_ARGUMENT", "HISTORY_SIDS: codes must lie in [0, 32)", "triton_error"),
    ("StatusCode.INTERNAL", "engine failed", "triton_error"),
])
def test_failure_reasons(status, message, reason):
    assert failure_reason(InferenceServerException(msg=message, status=status)) == reason


class _Param:
    def __init__(self, value: str) -> None:
        self.string_value = value


class _Tensor:
    def __init__(self, name: str) -> None:
        self.name = name


class _Config:
    def __init__(self, params: dict[str, str]) -> None:
        self.parameters = {key: _Param(value) for key, value in params.items()}
        self.input = [_Tensor("HISTORY_SIDS"), _Tensor("BANNED_SIDS")]


class _Entry:
    def __init__(self, version: str, state: str = "READY") -> None:
        self.name, self.version, self.state = "onerec", version, state


class _Result:
    """What `infer` returns: the response's model_version and the two output tensors."""

    def __init__(self, version: str) -> None:
        self.version = version

    def get_response(self):
        return type("Response", (), {"model_version": self.version})()

    def as_numpy(self, name):
        if name == "SESSION_SIDS":
            return np.zeros((1, 2, 3, 2), dtype=np.int32)
        return np.zeros((1, 2), dtype=np.float32)


class FakeTriton:
    """One replica's gRPC client: a model config's parameters, the READY versions, and a scripted infer (an
    error (status, message) to raise, or answer with the version asked for when it is ready)."""

    def __init__(self, params: dict[str, str] | None = None, ready: set[str] | None = None,
                 error: tuple[str, str] | None = None, gate: asyncio.Event | None = None) -> None:
        self.params = {"model_version": "3", "catalog_hash": "c3", "catalog_hash_3": "c3", **(params or {})}
        self.ready = set(ready if ready is not None else {"3"})
        self.error, self.gate = error, gate
        self.calls: list[str] = []  # the version each infer asked for
        self.closed = False

    async def get_model_config(self, model_name, client_timeout=None):
        if self.error is not None and "UNAVAILABLE" in self.error[0]:
            raise InferenceServerException(msg=self.error[1], status=self.error[0])
        return type("Response", (), {"config": _Config(self.params)})()

    async def get_model_repository_index(self, client_timeout=None):
        return type("Index", (), {"models": [_Entry(v) for v in sorted(self.ready)] + [_Entry("9", "UNAVAILABLE")]})()

    async def is_model_ready(self, model_name, model_version="", client_timeout=None):
        if self.error is not None and "UNAVAILABLE" in self.error[0]:
            raise InferenceServerException(msg=self.error[1], status=self.error[0])
        return (model_version or self.params["model_version"]) in self.ready

    async def infer(self, model_name, inputs, model_version="", request_id="", client_timeout=None):
        self.calls.append(model_version)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise InferenceServerException(msg=self.error[1], status=self.error[0])
        version = model_version or self.params["model_version"]
        if version not in self.ready:
            raise InferenceServerException(msg=f"Request for unknown model: 'onerec' version {version} is not "
                                           "found", status="StatusCode.NOT_FOUND")
        return _Result(version)

    async def close(self) -> None:
        self.closed = True


DEAD = ("StatusCode.UNAVAILABLE", "failed to connect to all addresses")
HISTORY = np.array([[1, 0]], dtype=np.int32)


def model_of(fakes: dict[str, FakeTriton], clock: Clock | None = None, attempts: int = 3,
             resolver=None, **kwargs) -> TritonModel:
    """A TritonModel whose replicas are `fakes` (address -> fake client), each with a breaker on `clock`."""
    clock = clock or Clock()

    async def as_given(target: str) -> list[str]:
        return [target]

    return TritonModel(list(fakes), "onerec", 1.0, 16, 4, lambda: CircuitBreaker(3, 1.0, clock=clock),
                       attempts=attempts, resolver=resolver or as_given, client=lambda address: fakes[address],
                       **kwargs)


@pytest.mark.parametrize(("params", "ready", "canary", "share"), [
    ({"canary_version": "4", "canary_share": "0.2", "catalog_hash_4": "c4"}, {"3", "4"}, "4", 0.2),
    ({"canary_version": "4", "canary_share": "0.2", "catalog_hash_4": "c4"}, {"3"}, None, 0.0),  # not loaded yet
    ({"canary_version": "4", "canary_share": "0", "catalog_hash_4": "c4"}, {"3", "4"}, None, 0.0),
    ({"canary_version": "4", "canary_share": "x", "catalog_hash_4": "c4"}, {"3", "4"}, None, 0.0),
    ({"canary_version": "", "canary_share": "0"}, {"3"}, None, 0.0),
    ({}, {"3"}, None, 0.0),  # a config written before canaries
])
def test_served_reads_the_primary_and_the_canary(params, ready, canary, share):
    served = asyncio.run(model_of({"a:1": FakeTriton(params, ready)}).served())
    assert (served.version, served.catalog_hash, served.bans_in_beam) == ("3", "c3", True)
    assert (served.canary_version, served.canary_share) == (canary, share)
    assert served.canary_catalog_hash == ("c4" if canary else "")


def test_served_without_a_serving_replica_says_why():
    unversioned = FakeTriton()
    unversioned.params = {}  # a config without the exporter's parameters

    async def scenario():
        with pytest.raises(ModelError) as down:
            await model_of({"a:1": FakeTriton(error=DEAD), "b:1": FakeTriton(ready=set())}).served()
        with pytest.raises(ModelError) as old:
            await model_of({"a:1": FakeTriton(error=DEAD), "b:1": unversioned}).served()
        return down.value, old.value

    down, old = asyncio.run(scenario())
    assert down.reason == "triton_unavailable" and "a:1" in str(down) and "not ready" in str(down)
    assert old.reason == "catalog_mismatch"


# --- per-request balancing, retries and per-replica breakers --------------------------------------------------


def test_requests_alternate_between_replicas():
    fakes = {"a:1": FakeTriton(), "b:1": FakeTriton()}

    async def scenario():
        model = model_of(fakes)
        await model.served()
        for _ in range(100):
            assert (await model.infer(HISTORY, True, version="3")).model_version == "3"

    asyncio.run(scenario())
    assert (len(fakes["a:1"].calls), len(fakes["b:1"].calls)) == (50, 50)


def test_concurrent_requests_go_round_robin():
    gate = asyncio.Event()
    fakes = {"a:1": FakeTriton(gate=gate), "b:1": FakeTriton(gate=gate), "c:1": FakeTriton()}

    async def scenario():
        model = model_of(fakes)
        await model.served()
        fakes["c:1"].gate = gate
        held = [asyncio.create_task(model.infer(HISTORY, True, version="3")) for _ in range(3)]
        await asyncio.sleep(0)
        assert sorted(len(f.calls) for f in fakes.values()) == [1, 1, 1]  # one each, not two on one
        gate.set()
        await asyncio.gather(*held)

    asyncio.run(scenario())


def test_a_replica_with_calls_piling_up_gets_no_more():
    """a hangs (its calls never return), b answers at once: round robin would send a every other request."""
    fakes = {"a:1": FakeTriton(gate=asyncio.Event()), "b:1": FakeTriton()}

    async def scenario():
        model = model_of(fakes)
        await model.served()
        held = []
        for _ in range(10):
            held.append(asyncio.create_task(model.infer(HISTORY, True, version="3")))
            await asyncio.sleep(0)
        assert len(fakes["a:1"].calls) == 2 and len(fakes["b:1"].calls) == 8  # a: one more than b, then no more
        fakes["a:1"].gate.set()
        await asyncio.gather(*held)

    asyncio.run(scenario())


def test_a_dead_replica_costs_no_request_and_its_breaker_opens_alone():
    clock = Clock()
    fakes = {"a:1": FakeTriton(), "b:1": FakeTriton()}

    async def scenario():
        model = model_of(fakes, clock)
        await model.served()
        fakes["a:1"].error = DEAD  # killed
        answers = [await model.infer(HISTORY, True, version="3") for _ in range(20)]
        assert all(answer.model_version == "3" for answer in answers)
        assert len(fakes["a:1"].calls) == 3  # three failures open its breaker; then it is not asked
        assert model.replicas["a:1"].breaker.state == "open" and model.replicas["b:1"].breaker.state == "closed"
        assert not model.circuit_open
        clock.now += 1.0  # half-open: one probe, which fails, and the request is retried on b
        assert (await model.infer(HISTORY, True, version="3")).model_version == "3"
        assert len(fakes["a:1"].calls) == 4
        fakes["a:1"].error = None  # restarted
        clock.now += 1.0
        for _ in range(10):
            await model.infer(HISTORY, True, version="3")
        assert model.replicas["a:1"].breaker.state == "closed" and len(fakes["a:1"].calls) >= 8

    asyncio.run(scenario())
    assert len(fakes["b:1"].calls) == 20 + 1 + 10 - (len(fakes["a:1"].calls) - 4)


def test_a_cancelled_probe_lets_the_next_one_through():
    clock = Clock()
    gate = asyncio.Event()
    fakes = {"a:1": FakeTriton(error=DEAD)}

    async def scenario():
        model = model_of(fakes, clock)
        for _ in range(3):
            with pytest.raises(ModelError):
                await model.infer(HISTORY, True, version="3")
        clock.now += 1.0
        fakes["a:1"].error, fakes["a:1"].gate = None, gate  # back, but the probe hangs and its caller leaves
        probe = asyncio.create_task(model.infer(HISTORY, True, version="3"))
        await asyncio.sleep(0)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        gate.set()
        return await model.infer(HISTORY, True, version="3")  # not stuck half-open with a probe "out"

    assert asyncio.run(scenario()).model_version == "3"


def test_every_replica_down_is_unavailable_then_circuit_open():
    fakes = {"a:1": FakeTriton(error=DEAD), "b:1": FakeTriton(error=DEAD)}

    async def scenario():
        model = model_of(fakes)
        reasons = []
        for _ in range(4):
            with pytest.raises(ModelError) as failed:
                await model.infer(HISTORY, True, version="3")
            reasons.append(failed.value.reason)
        return reasons, model.circuit_open

    reasons, circuit_open = asyncio.run(scenario())
    assert reasons == ["triton_unavailable"] * 3 + ["circuit_open"] and circuit_open
    assert len(fakes["a:1"].calls) == len(fakes["b:1"].calls) == 3


def test_attempts_bound_the_replicas_one_request_tries():
    fakes = {f"r{i}:1": FakeTriton(error=DEAD) for i in range(4)}

    async def scenario():
        with pytest.raises(ModelError):
            await model_of(fakes, attempts=2).infer(HISTORY, True, version="3")

    asyncio.run(scenario())
    assert sum(len(f.calls) for f in fakes.values()) == 2


@pytest.mark.parametrize(("error", "reason"), [
    (("StatusCode.INVALID_ARGUMENT", "HISTORY_SIDS: codes must lie in [0, 32)"), "triton_error"),
])
def test_an_error_every_replica_would_give_is_not_retried(error, reason):
    fakes = {"a:1": FakeTriton(error=error), "b:1": FakeTriton(error=error)}

    async def scenario():
        model = model_of(fakes)
        with pytest.raises(ModelError) as failed:
            await model.infer(HISTORY, True, version="3")
        return failed.value.reason, model

    got, model = asyncio.run(scenario())
    assert got == reason and len(fakes["a:1"].calls) + len(fakes["b:1"].calls) == 1
    assert all(r.breaker.state == "closed" for r in model.replicas.values())  # it answered: alive


def test_a_replica_without_the_pinned_version_sends_the_request_to_one_with_it():
    """Mid-rollout: b no longer holds version 3 (or never loaded it); the request pinned to 3 is answered by a,
    with version 3 (its catalog maps the answer), and b is asked for 3 no more until a refresh says it has it."""
    fakes = {"a:1": FakeTriton(ready={"3"}), "b:1": FakeTriton(ready={"3"})}

    async def scenario():
        model = model_of(fakes)
        await model.served()
        fakes["b:1"].ready = {"4"}  # unloaded behind the gateway's back
        answers = [await model.infer(HISTORY, True, version="3") for _ in range(10)]
        assert {answer.model_version for answer in answers} == {"3"}
        assert fakes["b:1"].calls == ["3"]  # once, answered version_unavailable, then known not to hold it
        assert model.replicas["b:1"].breaker.state == "closed"
        fakes["a:1"].ready = {"4"}
        with pytest.raises(ModelError) as gone:
            await model.infer(HISTORY, True, version="3")
        assert gone.value.reason == "version_unavailable"  # nobody holds it: the gateway re-syncs

    asyncio.run(scenario())


def test_known_holders_of_the_version_are_asked_first():
    fakes = {"a:1": FakeTriton({"model_version": "4", "catalog_hash_4": "c4"}, ready={"4"}),
             "b:1": FakeTriton(ready={"3", "4"})}

    async def scenario():
        model = model_of(fakes)
        await model.served()
        for _ in range(6):
            await model.infer(HISTORY, True, version="3")
        for _ in range(6):
            await model.infer(HISTORY, True, version="4")

    asyncio.run(scenario())
    assert fakes["a:1"].calls == ["4"] * 3 and fakes["b:1"].calls == ["3"] * 6 + ["4"] * 3


# --- the version the gateway pins when the replicas disagree (a rollout loads them in turn) ------------------


def view(primary: str, ready: set[str], canary: str | None = None) -> FakeTriton:
    params = {"model_version": primary, "catalog_hash": f"c{primary}", **{f"catalog_hash_{v}": f"c{v}" for v in ready}}
    if canary:
        params.update(canary_version=canary, canary_share="0.2")
    return FakeTriton(params, ready)


def test_deploy_half_loaded_keeps_the_version_every_replica_holds_then_follows():
    fakes = {"a:1": view("1", {"1"}), "b:1": view("1", {"1"})}

    async def scenario():
        model = model_of(fakes)
        assert (await model.served()).version == "1"
        fakes["a:1"].params, fakes["a:1"].ready = view("2", {"1", "2"}).params, {"1", "2"}  # a loaded
        assert (await model.served()).version == "1"  # 2 is on a only; 1 on both
        fakes["b:1"].params, fakes["b:1"].ready = view("2", {"1", "2"}).params, {"1", "2"}  # b loaded
        assert (await model.served()).version == "2"
        # rollback, a first: both still hold 1 and 2 (the replaced version stays loaded): the pin holds still
        fakes["a:1"].params = view("1", {"1", "2"}).params
        assert (await model.served()).version == "2"
        fakes["b:1"].params = view("1", {"1", "2"}).params
        assert (await model.served()).version == "1"

    asyncio.run(scenario())


def test_the_pin_follows_what_every_replica_holds_not_the_majority_view():
    fakes = {"a:1": view("2", {"1", "2"}), "b:1": view("2", {"1", "2"}), "c:1": view("1", {"1"})}

    async def scenario():
        model = model_of(fakes)
        first = (await model.served()).version
        fakes["c:1"].params, fakes["c:1"].ready = view("2", {"1", "2"}).params, {"1", "2"}
        return first, (await model.served()).version

    assert asyncio.run(scenario()) == ("1", "2")  # two of three report 2, but only 1 is answered everywhere


def test_a_canary_half_loaded_waits_for_every_replica():
    fakes = {"a:1": view("1", {"1", "2"}, canary="2"), "b:1": view("1", {"1"})}

    async def scenario():
        model = model_of(fakes)
        first = await model.served()
        fakes["b:1"].params, fakes["b:1"].ready = fakes["a:1"].params, {"1", "2"}
        return first, await model.served()

    first, second = asyncio.run(scenario())
    assert (first.version, first.canary_version) == ("1", None)
    assert (second.version, second.canary_version, second.canary_share) == ("1", "2", 0.2)


def test_a_dead_or_loading_replica_does_not_decide_the_pin():
    fakes = {"a:1": view("2", {"2"}), "b:1": FakeTriton(error=DEAD), "c:1": view("1", set())}

    async def scenario():
        model = model_of(fakes)
        served = await model.served()
        return served, await model.ready()

    served, ready = asyncio.run(scenario())
    assert served.version == "2" and ready


def test_ready_when_one_replica_is():
    async def scenario(fakes):
        return await model_of(fakes).ready()

    assert asyncio.run(scenario({"a:1": FakeTriton(error=DEAD), "b:1": FakeTriton()}))
    assert not asyncio.run(scenario({"a:1": FakeTriton(error=DEAD), "b:1": FakeTriton(ready=set())}))


# --- endpoints: a list, or a name resolving to several addresses ----------------------------------------------


def test_a_name_resolving_to_several_addresses_is_several_replicas_and_follows_dns():
    records = {"triton:8001": ["10.0.0.1:8001", "10.0.0.2:8001"]}
    fakes = {address: FakeTriton() for address in ("triton:8001", "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001")}

    async def resolver(target: str) -> list[str]:
        if records[target] is None:
            raise OSError("Temporary failure in name resolution")
        return records[target]

    async def scenario():
        model = TritonModel("triton:8001", "onerec", 1.0, 16, 4, attempts=3, resolver=resolver,
                            client=lambda address: fakes[address])
        assert list(model.replicas) == ["triton:8001"]  # before the first resolution: gRPC's own
        await model.served()
        assert list(model.replicas) == ["10.0.0.1:8001", "10.0.0.2:8001"] and fakes["triton:8001"].closed
        for _ in range(4):
            await model.infer(HISTORY, True, version="3")
        records["triton:8001"] = ["10.0.0.2:8001", "10.0.0.3:8001"]  # a pod replaced
        await model.served()
        assert list(model.replicas) == ["10.0.0.2:8001", "10.0.0.3:8001"] and fakes["10.0.0.1:8001"].closed
        records["triton:8001"] = None  # DNS hiccup: keep what we have
        await model.served()
        assert list(model.replicas) == ["10.0.0.2:8001", "10.0.0.3:8001"]
        await model.close()

    asyncio.run(scenario())
    assert len(fakes["10.0.0.1:8001"].calls) == len(fakes["10.0.0.2:8001"].calls) == 2
    assert all(fake.closed for fake in fakes.values())


def test_resolve_literal_and_localhost():
    assert asyncio.run(resolve("127.0.0.1:8001")) == ["127.0.0.1:8001"]
    assert asyncio.run(resolve("[::1]:8001")) == ["[::1]:8001"]
    assert asyncio.run(resolve("localhost:8001")) == ["127.0.0.1:8001"]  # IPv4 records only, when there are any


@pytest.mark.parametrize("bad", ["triton", "triton:x", "a:1,,b", ":8001", "a b:1", "h:70000"])
def test_split_target_refuses(bad):
    with pytest.raises(ValueError):
        for target in bad.split(","):
            split_target(target)


def test_settings_take_a_comma_separated_list():
    assert Settings(triton_url=" 10.0.0.1:8001, triton-1:8001 ").triton_targets == ["10.0.0.1:8001", "triton-1:8001"]
    assert Settings().triton_targets == ["127.0.0.1:8001"]
    with pytest.raises(ValidationError, match="host:port"):
        Settings(triton_url="10.0.0.1:8001,triton")
