"""`onerec deploy | rollback | promote | canary | status`: new model versions and canaries on a live Triton."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import JsonOption, Precision, StateOption, user_errors
from onerec.errors import UsageError

app = typer.Typer()
log = logging.getLogger("onerec")

OptionalRun = Annotated[Path | None, typer.Option(
    "--run", help="Run directory: its running stack (RUN/stack) says where the repository and Triton are.")]
RepoOption = Annotated[Path | None, typer.Option(
    envvar="ONEREC_MODEL_REPO", help="The live Triton model repository (default: the stack's, else RUN/model_repo).")]
TritonOption = Annotated[str | None, typer.Option(
    envvar="ONEREC_TRITON_HTTP_URL", help="Triton's HTTP address, or every replica's, comma-separated (default: "
    "the stack's, else 127.0.0.1:8000).")]
WaitOption = Annotated[float, typer.Option(
    help="Seconds to wait for the stack's gateway to serve the new primary and canary (0: do not wait).")]


@dataclass(frozen=True)
class Target:
    """Where a rollout acts: the repository, Triton's HTTP address, and the gateway when a stack is known."""

    repo: Path
    triton_url: str
    gateway_url: str | None


def resolve_target(run_dir: Path | None, model_repo: Path | None, triton_url: str | None,
                   state_dir: Path | None) -> Target:
    """Flags first, then the running stack of RUN, then the defaults; UsageError when there is no repository."""
    from stack.local import StackState

    state = None
    if run_dir is not None:
        state = StackState.read((state_dir or run_dir / "stack").resolve())
    if model_repo is None:
        if state is not None:
            model_repo = Path(state.model_repo)
        elif run_dir is not None:
            model_repo = run_dir / "model_repo"
        else:
            raise UsageError("--model-repo: give the live repository (or --run RUN of a running stack)")
    if not model_repo.is_dir():
        raise UsageError(f"--model-repo: {model_repo} is not a directory")
    # the stack's every Triton replica: a rollout loads on each
    url = triton_url or (",".join(state.triton_http_urls) if state is not None else "http://127.0.0.1:8000")
    return Target(model_repo, url, state.gateway_url if state is not None else None)


def _control(target: Target) -> Any:
    from export.rollout import control_for

    return control_for(target.triton_url)


def _report(change: Any, target: Target, wait: float, as_json: bool) -> None:
    followed = _wait_gateway(target, str(change.primary), None if change.canary is None else str(change.canary), wait)
    result = {**change.as_json(), "model_repo": str(target.repo), "gateway_follows": followed}
    if as_json:
        typer.echo(json.dumps(result))
        return
    canary = f", canary {change.canary} for {change.canary_share:.0%} of users" if change.canary else ""
    typer.echo(f"{change.action}: version {change.version}; primary {change.primary}{canary}; Triton holds "
               f"{', '.join(map(str, change.loaded))}" + (" (weights shared)" if change.weights_shared else ""))
    if followed is False:
        also = f" and canary {change.canary}" if change.canary else ""
        typer.echo(f"warning: the gateway {target.gateway_url} did not report version {change.primary}{also} within "
                   f"{wait:.0f}s (it re-checks every ONEREC_SYNC_INTERVAL_S)", err=True)


def _wait_gateway(target: Target, primary: str, canary: str | None, wait: float) -> bool | None:
    """True once the stack's gateway reports `primary` (and `canary`, or no canary) in /readyz, False after `wait`
    s; None with no gateway."""
    if target.gateway_url is None or wait <= 0:
        return None
    from export.rollout import wait_until
    from stack.probes import get_json

    def followed() -> bool:
        body = get_json(f"{target.gateway_url}/readyz")[1]
        return body.get("model_version") == primary and body.get("canary_version") == canary

    return wait_until(followed, wait)


@app.command()
@user_errors
def deploy(
    run_dir: Annotated[Path, typer.Option("--run", help="Trained run directory to deploy.")],
    checkpoint: Annotated[Path | None, typer.Option(
        help="Model directory to deploy (default RUN/model; e.g. RUN/align/iter_2).")] = None,
    canary: Annotated[float | None, typer.Option(
        help="Serve the new version to this share of users (0 < SHARE <= 1, a stable hash of user_id) next to "
             "the primary, instead of to everyone.")] = None,
    model_repo: RepoOption = None,
    triton_url: TritonOption = None,
    state_dir: StateOption = None,
    precision: Annotated[Precision, typer.Option(help="Export precision (auto: the served version's).")] = (
        Precision.auto),
    wait: WaitOption = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Export RUN as the next version of the live repository and have Triton serve it (weights hard-linked from
    an earlier version when only the catalog changed); the gateway follows within ONEREC_SYNC_INTERVAL_S."""
    from export.rollout import deploy as run_deploy
    from export.rollout import parse_share

    if canary is not None:
        parse_share(canary)
    if checkpoint is not None and not (checkpoint / "model.safetensors").is_file():
        raise UsageError(f"--checkpoint: {checkpoint} is not a model directory (no model.safetensors)")
    target = resolve_target(run_dir, model_repo, triton_url, state_dir)
    change = run_deploy(run_dir, target.repo, _control(target), checkpoint, canary, precision.value)
    _report(change, target, wait, as_json)


@app.command()
@user_errors
def rollback(run_dir: OptionalRun = None, model_repo: RepoOption = None, triton_url: TritonOption = None,
             state_dir: StateOption = None, wait: WaitOption = 30.0, as_json: JsonOption = False) -> None:
    """Serve the previous version again: during a canary, stop the canary (every user back on the primary);
    otherwise the primary before the current one."""
    from export.rollout import rollback as run_rollback

    target = resolve_target(run_dir, model_repo, triton_url, state_dir)
    _report(run_rollback(target.repo, _control(target)), target, wait, as_json)


@app.command()
@user_errors
def promote(run_dir: OptionalRun = None, model_repo: RepoOption = None, triton_url: TritonOption = None,
            state_dir: StateOption = None, wait: WaitOption = 30.0, as_json: JsonOption = False) -> None:
    """Make the canary the primary: every user on it."""
    from export.rollout import promote as run_promote

    target = resolve_target(run_dir, model_repo, triton_url, state_dir)
    _report(run_promote(target.repo, _control(target)), target, wait, as_json)


@app.command()
@user_errors
def canary(share: Annotated[float, typer.Option(help="Share of users on the canary, 0 < SHARE <= 1.")],
           run_dir: OptionalRun = None, model_repo: RepoOption = None, triton_url: TritonOption = None,
           state_dir: StateOption = None, as_json: JsonOption = False) -> None:
    """Change the running canary's share of users (raising it keeps the users it had and adds others)."""
    from export.rollout import parse_share, set_share

    parse_share(share, "--share")
    target = resolve_target(run_dir, model_repo, triton_url, state_dir)
    _report(set_share(target.repo, _control(target), share), target, 0.0, as_json)


@app.command()
@user_errors
def status(run_dir: OptionalRun = None, model_repo: RepoOption = None, triton_url: TritonOption = None,
           state_dir: StateOption = None, as_json: JsonOption = False) -> None:
    """The stack of RUN (URLs, pids, alive, /readyz) and the model versions: on disk, the rollout (primary,
    canary) and what Triton has loaded."""
    from export.rollout import status as model_status
    from stack.local import Stack, StackConfig

    stack = Stack(StackConfig(run=run_dir, state_dir=state_dir)).status() if run_dir is not None else None
    try:
        target = resolve_target(run_dir, model_repo, triton_url, state_dir)
    except UsageError:
        if run_dir is None:
            raise
        target = None  # a run with no repository yet: the stack part alone
    running = stack is None or stack.get("running")
    model = model_status(target.repo, _control(target) if running else None) if target is not None else None
    if as_json:
        typer.echo(json.dumps({**(stack or {}), "model": model}))
        return
    if stack is not None:
        alive = ", ".join(f"{name} {'up' if up else 'DOWN'}" for name, up in stack.get("alive", {}).items())
        typer.echo(f"stack     {'running' if stack['running'] else 'not running'}"
                   + (f" ({alive}); ready: {stack['ready']}" if stack["running"] else ""))
    if model is None:
        return
    rollout = model["rollout"] or {}
    typer.echo(f"repo      {model['model_repo']}")
    if rollout:
        canary = (f"; canary {rollout['canary']} for {rollout['canary_share']:.0%} of users"
                  if rollout.get("canary") else "")
        typer.echo(f"serving   primary {rollout['primary']}{canary}")
    for version in model["versions"]:
        typer.echo(f"version   {version['version']}  catalog {version['catalog_hash'][:12]}  {version['precision']}"
                   f"  {version['created']}" + ("  (weights shared)" if version["weights_links"] > 1 else ""))
    if model.get("triton") is not None:
        loaded = [f"{entry.get('version')} {entry.get('state')}" for entry in model["triton"]]
        typer.echo(f"triton    {', '.join(loaded) or 'nothing loaded'}")
    elif model.get("triton_error"):
        typer.echo(f"triton    {model['triton_error']}")
