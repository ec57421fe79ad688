"""Rollout without a restart: `deploy`, `rollback`, `promote`, the canary's share and `status` over a live
repository and Triton.

Triton runs with explicit model control (`--model-control-mode=explicit --load-model=onerec`): nothing changes
what it serves until `load` is called through its repository API, which answers once the new versions are loaded
(or with the reason they are not). Polling would act on whatever is on disk at each poll, with no answer to wait
for and no failure to react to. Each change writes `rollout.json` and config.pbtxt (version policy `specific`:
the primary, the canary, and the ones they replace, so that a gateway still pinned to a replaced version keeps
being answered until its next sync), then loads; if Triton refuses, both files are put back, Triton is asked to
load them again, and a version this deploy created is removed: the repository is as it was."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from export.repository import RolloutState, export_run, write_config
from onerec.errors import UsageError
from onerec.runs import advisory_lock
from onerec.serving import layout

log = logging.getLogger(__name__)


class ModelControl(Protocol):
    """What a rollout asks of Triton (the repository API; a fake in unit tests)."""

    def load(self, model: str) -> None: ...
    def index(self) -> list[dict[str, Any]]: ...


class TritonControl:
    """Triton's HTTP repository API: `POST /v2/repository/models/<m>/load` and `POST /v2/repository/index`."""

    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = f"http://{self.url}"
        self.timeout_s = timeout_s

    def _post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", json.dumps(body).encode(),
                                         {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (operator URL)
                text = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("error", detail)
            raise UsageError(f"triton {self.url}: {detail.strip() or f'HTTP {e.code}'}") from e
        except (urllib.error.URLError, OSError) as e:
            raise UsageError(f"--triton-url {self.url}: Triton does not answer ({e})") from e
        return json.loads(text) if text else None

    def load(self, model: str) -> None:
        """Re-read `model`'s config and versions from the repository; returns once they are loaded."""
        self._post(f"/v2/repository/models/{model}/load", {})

    def index(self) -> list[dict[str, Any]]:
        """Every model version Triton knows: [{"name", "version", "state", "reason"}]."""
        return self._post("/v2/repository/index", {}) or []


class Replicas:
    """Several Tritons serving one shared repository (replicas): each loads; a version counts as ready only
    where every replica has it ready."""

    def __init__(self, controls: list[ModelControl]) -> None:
        self.controls = controls

    def load(self, model: str) -> None:
        for control in self.controls:
            control.load(model)

    def index(self) -> list[dict[str, Any]]:
        indexes = [control.index() for control in self.controls]
        ready = [{(e.get("name"), e.get("version")) for e in index if e.get("state") == "READY"} for index in indexes]
        everywhere = set.intersection(*ready) if ready else set()
        return [e if (e.get("name"), e.get("version")) in everywhere else {**e, "state": "UNAVAILABLE"}
                for e in indexes[0]] if indexes else []


def control_for(urls: str, timeout_s: float = 600.0) -> ModelControl:
    """The repository API of one Triton (`host:port`) or of every replica (`host1:port,host2:port`)."""
    controls = [TritonControl(url.strip(), timeout_s) for url in urls.split(",") if url.strip()]
    if not controls:
        raise UsageError("--triton-url: no address given")
    return controls[0] if len(controls) == 1 else Replicas(controls)


@dataclass(frozen=True)
class Change:
    """What one rollout command did."""

    action: str  # deploy | canary | canary-share | promote | rollback | abort-canary
    primary: int
    canary: int | None
    canary_share: float
    loaded: tuple[int, ...]
    version: int  # the version the command is about (deployed, rolled back to, promoted)
    weights_shared: bool = False

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"loaded": list(self.loaded)}


@contextlib.contextmanager
def exclusive(model_dir: Path) -> Iterator[None]:
    """One rollout at a time per repository (an advisory lock on `.rollout.lock`); UsageError when one runs."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with advisory_lock(model_dir / ".rollout.lock",
                       f"{model_dir}: another deploy, rollback or promote is running; retry when it ends"):
        yield


def one_at_a_time(fn: Callable[..., Change]) -> Callable[..., Change]:
    """Run a rollout command holding its repository's lock (`exclusive`)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Change:
        repo = signature.bind(*args, **kwargs).arguments["repo"]
        with exclusive(layout.model_dir(repo)):
            return fn(*args, **kwargs)

    return wrapper


def current_state(model_dir: Path) -> RolloutState:
    """The repository's rollout state; for a repository exported before rollouts, its newest version alone."""
    state = RolloutState.load(model_dir)
    if state is not None:
        return state
    versions = layout.version_dirs(model_dir)
    if not versions or not (model_dir / layout.CONFIG_FILE).is_file():
        raise UsageError(f"{model_dir}: no exported version is served (run `onerec export` or `onerec up` first)")
    newest = int(versions[0].name)
    return RolloutState(newest, (newest,), history=(newest,))


def parse_share(share: float, option: str = "--canary") -> float:
    if not 0.0 < share <= 1.0:
        raise UsageError(f"{option}: the share of users must lie in (0, 1], got {share}")
    return share


@one_at_a_time
def deploy(run_dir: Path, repo: Path, control: ModelControl, checkpoint: Path | None = None,
           canary: float | None = None, precision: str = "auto") -> Change:
    """Export the run as the next version and have Triton serve it: as the primary, or, with `canary` (a share
    of users in (0, 1]), next to the primary for that share. The repository is unchanged when anything fails."""
    model_dir = layout.model_dir(repo)
    share = None if canary is None else parse_share(canary)
    state = current_state(model_dir)
    if precision == "auto":  # the served precision, so that unchanged weights are shared, not exported again
        precision = layout.Manifest.load(model_dir / str(state.primary)).precision
    final = export_run(run_dir, repo, precision, state.serving, checkpoint, activate=False)
    version = int(final.name)
    weights_shared = (final / layout.DECODER_FILE).stat().st_nlink > 1
    if share is None:
        new = RolloutState(version, _loaded(version, None, state), history=(*state.history, version),
                           serving=state.serving)
    else:
        new = RolloutState(state.primary, _loaded(state.primary, version, state), canary=version,
                           canary_share=share, history=state.history, serving=state.serving)
    try:
        apply(model_dir, new, control)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # never served: the repository is as it was
        raise
    log.info("deployed version %d (%s)", version, "primary" if share is None else f"canary for {share:.0%}")
    return Change("deploy" if share is None else "canary", new.primary, new.canary, new.canary_share, new.loaded,
                  version, weights_shared)


@one_at_a_time
def rollback(repo: Path, control: ModelControl) -> Change:
    """Serve the previous version again: with a canary, stop it (every user back on the primary); otherwise the
    primary before the current one (the deploy history, else the next lower version on disk)."""
    model_dir = layout.model_dir(repo)
    state = current_state(model_dir)
    if state.canary is not None:
        new = RolloutState(state.primary, _loaded(state.primary, None, state), history=state.history,
                           serving=state.serving)
        apply(model_dir, new, control)
        return Change("abort-canary", new.primary, None, 0.0, new.loaded, state.canary)
    previous = _previous(model_dir, state)
    history = state.history[:-1] if state.history[-2:-1] == (previous,) else (*state.history[:-1], previous)
    new = RolloutState(previous, _loaded(previous, None, state), history=history, serving=state.serving)
    apply(model_dir, new, control)
    log.info("rolled back from version %d to %d", state.primary, previous)
    return Change("rollback", previous, None, 0.0, new.loaded, previous)


@one_at_a_time
def promote(repo: Path, control: ModelControl) -> Change:
    """Make the canary the primary (every user on it)."""
    model_dir = layout.model_dir(repo)
    state = current_state(model_dir)
    if state.canary is None:
        raise UsageError(f"{model_dir}: no canary to promote (deploy one with `onerec deploy --canary SHARE`)")
    new = RolloutState(state.canary, _loaded(state.canary, None, state), history=(*state.history, state.canary),
                       serving=state.serving)
    apply(model_dir, new, control)
    return Change("promote", new.primary, None, 0.0, new.loaded, new.primary)


@one_at_a_time
def set_share(repo: Path, control: ModelControl, share: float) -> Change:
    """Route `share` of the users to the current canary (raising it only adds users: the split is a threshold)."""
    share = parse_share(share, "--share")
    model_dir = layout.model_dir(repo)
    state = current_state(model_dir)
    if state.canary is None:
        raise UsageError(f"{model_dir}: no canary (deploy one with `onerec deploy --canary SHARE`)")
    new = dataclasses.replace(state, canary_share=share)
    apply(model_dir, new, control)
    return Change("canary-share", new.primary, new.canary, share, new.loaded, state.canary)


def apply(model_dir: Path, new: RolloutState, control: ModelControl) -> None:
    """Write `new` (config.pbtxt + rollout.json) and have Triton load it; on any failure the files are put back
    and Triton asked to load them again, and UsageError says why."""
    saved = {name: (model_dir / name).read_bytes() if (model_dir / name).is_file() else None
             for name in (layout.CONFIG_FILE, layout.ROLLOUT_FILE)}
    try:
        write_config(model_dir, new)
        control.load(layout.MODEL_NAME)
        missing = sorted(set(new.loaded) - ready_versions(control))
        if missing:
            raise UsageError(f"triton did not load version(s) {missing} of {layout.MODEL_NAME} (see its log)")
    except BaseException as failure:
        _restore(model_dir, saved)
        try:
            control.load(layout.MODEL_NAME)
        except UsageError as e:
            log.error("reloading the previous config failed too: %s", e)
        if isinstance(failure, UsageError):
            raise UsageError(f"{failure}; the repository is as it was") from failure
        raise


def status(repo: Path, control: ModelControl | None) -> dict[str, Any]:
    """The rollout state, every version on disk, and (when Triton answers) the versions it has loaded."""
    model_dir = layout.model_dir(repo)
    state = RolloutState.load(model_dir)
    versions = []
    for directory in reversed(layout.version_dirs(model_dir)):
        manifest = layout.Manifest.load(directory)
        versions.append({"version": manifest.model_version, "catalog_hash": manifest.catalog_hash,
                         "precision": manifest.precision, "created": manifest.created,
                         "source_checkpoint": manifest.source_checkpoint,
                         "weights_links": (directory / layout.DECODER_FILE).stat().st_nlink
                         if (directory / layout.DECODER_FILE).is_file() else 0})
    result: dict[str, Any] = {"model_repo": str(repo), "rollout": state.as_json() if state else None,
                              "versions": versions, "triton": None}
    if control is not None:
        try:
            result["triton"] = [entry for entry in control.index() if entry.get("name") == layout.MODEL_NAME]
        except UsageError as e:
            result["triton_error"] = str(e)
    return result


def ready_versions(control: ModelControl) -> set[int]:
    return {int(entry["version"]) for entry in control.index()
            if entry.get("name") == layout.MODEL_NAME and entry.get("state") == "READY" and entry.get("version")}


def wait_until(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.25) -> bool:
    """Poll `check` until it holds (True) or `timeout_s` passes (False)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def _loaded(primary: int, canary: int | None, replaced: RolloutState) -> tuple[int, ...]:
    """The new primary and canary, plus the primary and canary they replace (gateways pinned to those keep being
    answered until their next sync); everything else is unloaded."""
    keep = {primary, replaced.primary} | ({canary} if canary is not None else set())
    if replaced.canary is not None:
        keep.add(replaced.canary)
    return tuple(sorted(keep))


def _previous(model_dir: Path, state: RolloutState) -> int:
    on_disk = {int(d.name) for d in layout.version_dirs(model_dir)}
    if len(state.history) >= 2 and state.history[-2] in on_disk:
        return state.history[-2]
    lower = [v for v in on_disk if v < state.primary]
    if not lower:
        raise UsageError(f"{model_dir}: version {state.primary} is the oldest version; nothing to roll back to")
    return max(lower)


def _restore(model_dir: Path, saved: dict[str, bytes | None]) -> None:
    for name, content in saved.items():
        path = model_dir / name
        if content is None:
            path.unlink(missing_ok=True)
        else:
            tmp = path.with_name(f".{name}.restore")
            tmp.write_bytes(content)
            tmp.replace(path)
