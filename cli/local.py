"""`onerec up | down | recommend`: the local stack of one run (`onerec status` is in cli/rollout.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from cli.common import Precision, RunOption, StateOption, user_errors
from onerec.errors import UsageError
from onerec.runs import RunDir
from onerec.serving import layout

app = typer.Typer()
log = logging.getLogger("onerec")


def export_if_needed(run_dir: Path, repo: Path, checkpoint: Path | None, precision: str) -> None:
    """Export the run (or `checkpoint`) into `repo` unless its latest version already is that model."""
    from export.repository import export_run, needs_export

    reason = needs_export(RunDir(run_dir), repo, checkpoint)
    if reason:
        log.info("exporting %s into %s (%s)", run_dir, repo, reason)
        log.info("exported %s", export_run(run_dir, repo, precision, checkpoint=checkpoint))



@app.command()
@user_errors
def up(
    run_dir: RunOption,
    model_repo: Annotated[Path | None, typer.Option(
        help="Triton model repository (default RUN/model_repo); the run is exported into it when needed.")] = None,
    state_dir: StateOption = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Model directory to serve (default RUN/model; e.g. RUN/align/iter_1, an IPA iteration).")] = None,
    host: Annotated[str, typer.Option(help="Address every server listens on.")] = "127.0.0.1",
    gateway_port: Annotated[int, typer.Option(help="Gateway HTTP port.")] = 8080,
    redis_port: Annotated[int, typer.Option(
        help="Redis port (with --redis-cluster: the first node's; the others follow it).")] = 6379,
    redis_cluster: Annotated[int, typer.Option(
        help="Start a local Redis Cluster of N masters (N >= 3) instead of one redis-server; 0: standalone.")] = 0,
    redis_replicas: Annotated[int, typer.Option(
        help="Replicas per cluster master (events are then acknowledged once a replica holds them).")] = 0,
    triton_http_port: Annotated[int, typer.Option(help="Triton HTTP port.")] = 8000,
    triton_grpc_port: Annotated[int, typer.Option(help="Triton gRPC port.")] = 8001,
    triton_metrics_port: Annotated[int, typer.Option(help="Triton metrics port.")] = 8002,
    triton_replicas: Annotated[int, typer.Option(
        help="tritonservers on the same repository (replica i listens on each Triton port + 10*i); the gateway "
             "balances requests over them and retries on another when one fails.")] = 1,
    workers: Annotated[int, typer.Option(help="Gateway worker processes.")] = 1,
    beam_width: Annotated[int, typer.Option(help="Beam width the gateway asks for.")] = layout.DEFAULT_BEAM_WIDTH,
    precision: Annotated[Precision, typer.Option(help="Export precision when the run must be exported.")] = (
        Precision.auto),
    timeout: Annotated[float, typer.Option(help="Seconds each server may take to become ready.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stack state as JSON.")] = False,
) -> None:
    """Start Redis (one server, or a local Redis Cluster), tritonserver (or several replicas) and the gateway for a
    trained run (exporting it if needed), load the users' histories, and return once the gateway's /readyz is
    ready. The processes keep running: `onerec down` stops them."""
    from stack.local import Stack, StackConfig
    from stack.triton import TritonPorts

    if triton_replicas < 1:
        raise UsageError(f"--triton-replicas: at least 1, got {triton_replicas}")
    if workers < 1 or beam_width < 1:
        raise UsageError(f"--workers and --beam-width must be >= 1, got {workers} and {beam_width}")
    if redis_cluster < 0 or redis_cluster in (1, 2):
        raise UsageError(f"--redis-cluster: a Redis Cluster needs at least 3 masters (0: standalone), got "
                         f"{redis_cluster}")
    if redis_replicas < 0 or (redis_replicas and not redis_cluster):
        raise UsageError(f"--redis-replicas {redis_replicas}: must be >= 0, and needs --redis-cluster")
    if checkpoint is not None and not (checkpoint / "model.safetensors").is_file():
        raise UsageError(f"--checkpoint: {checkpoint} is not a model directory (no model.safetensors)")
    cfg = StackConfig(run=run_dir, model_repo=model_repo, state_dir=state_dir, host=host, gateway_port=gateway_port,
                      redis_port=redis_port, redis_cluster=redis_cluster, redis_replicas=redis_replicas,
                      triton_ports=TritonPorts(triton_http_port, triton_grpc_port, triton_metrics_port),
                      triton_replicas=triton_replicas,
                      workers=workers, beam_width=beam_width, timeout_s=timeout)
    state = Stack(cfg).up(before_start=lambda: export_if_needed(run_dir, cfg.repo, checkpoint, precision.value))
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps(asdict(state)))
        return
    typer.echo(f"gateway   {state.gateway_url}   (model version {state.model_version}, repo {state.model_repo})")
    for replica in state.triton_replicas:
        typer.echo(f"triton    {replica['http_url']}   grpc {replica['grpc_url']}   metrics {replica['metrics_url']}")
    cluster = f"   (cluster of {len(state.redis_urls)} nodes)" if state.redis_mode == "cluster" else ""
    typer.echo(f"redis     {state.redis_url}{cluster}")
    typer.echo(f"logs      {Path(state.logs['gateway']).parent}")
    typer.echo(f"stop it with: onerec down --run {run_dir}")


@app.command()
@user_errors
def down(run_dir: RunOption, state_dir: StateOption = None) -> None:
    """Stop the stack `onerec up` started for RUN (gateway, then every Triton replica, then Redis or every cluster
    node); prints what it stopped."""
    from stack.local import Stack, StackConfig

    stopped = Stack(StackConfig(run=run_dir, state_dir=state_dir)).down()
    typer.echo(json.dumps(stopped) if stopped else "nothing running")


@app.command()
@user_errors
def recommend(
    run_dir: RunOption,
    user: Annotated[list[str] | None, typer.Option(help="User id (repeatable; default: a few loaded users).")] = None,
    count: Annotated[int, typer.Option(help="Users to ask for when no --user is given.")] = 3,
    state_dir: StateOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per answer.")] = False,
) -> None:
    """Ask the running stack for recommendations and print them with titles (MovieLens u.item when the run has it)."""
    from stack.local import Stack, StackConfig, ask_gateway, describe

    stack = Stack(StackConfig(run=run_dir, state_dir=state_dir))
    answers = ask_gateway(stack.running(), user or [], count)
    titles = {} if as_json else run_titles(run_dir)
    for answer in answers:
        typer.echo(json.dumps(answer) if as_json else describe(answer, titles))


def run_titles(run_dir: Path) -> dict[int, str]:
    """Video titles of the run's source (MovieLens u.item), {} when it has none."""
    from onerec.data.sources import item_titles

    return item_titles(RunDir(run_dir).read_marker("prepare"))
