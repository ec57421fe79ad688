"""`onerec export | triton | load-histories | serve`: the model repository, Triton, Redis histories, the gateway."""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cli.common import Precision, RunOption, progress, user_errors
from onerec.config import get_preset
from onerec.errors import UsageError
from onerec.runs import RunDir

app = typer.Typer()
log = logging.getLogger("onerec")
# uvicorn's httptools protocol with a draining shutdown (service/draining.py): a rolling restart drops no request
DRAINING_HTTP = "service.draining:DrainingHttpToolsProtocol"


@app.command("export")
@user_errors
def export_cmd(
    run_dir: RunOption,
    out: Annotated[Path, typer.Option("--out", help="Triton model repository to add a version to.")] = Path(
        "model_repo"),
    precision: Annotated[Precision, typer.Option(
        help="Decoder/encoder weights and KV cache: fp16 (GPU), fp32 (CPU) or auto (fp16 when CUDA is here).")
    ] = Precision.auto,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check the export against torch on test users and print the parity report as JSON.")
    ] = False,
    users: Annotated[int, typer.Option(help="Test users --verify compares on.")] = 32,
    device: Annotated[str, typer.Option(help="Where Triton runs the backend: auto, cpu or cuda.")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Requests Triton's dynamic batcher hands over at once.")] = 16,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Model directory to export (default RUN/model; e.g. RUN/align/iter_2 for an IPA iteration).")] = None,
    session_len: Annotated[int | None, typer.Option(
        help="Items per served session (SESSION_SIDS' m): 1 = the best next items, ranked; 0 = whole sessions of "
        "the model's m items (default: the trained preset's).")] = None,
) -> None:
    """Write the run's model and catalog as a new version of the Triton model `onerec`."""
    from export.repository import ServingConfig, export_run

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: unknown device {device!r}; use auto, cpu or cuda")
    if max_batch_size < 1:
        raise UsageError(f"--max-batch-size: must be >= 1, got {max_batch_size}")
    serving = ServingConfig(device=device, max_batch_size=max_batch_size, session_len=session_len)
    if checkpoint is not None and not (checkpoint / "model.safetensors").is_file():
        raise UsageError(f"--checkpoint: {checkpoint} is not a model directory (no model.safetensors)")
    version = export_run(run_dir, out, precision.value, serving, checkpoint)
    typer.echo(f"exported {version}", err=True)
    if verify:
        from export.verify import verify as run_verify
        from onerec.data.sessions import Sessions
        from onerec.model.onerec import load_model

        run = RunDir(run_dir)
        beam = get_preset(run.read_marker("train")["preset"]).beam
        report = run_verify(load_model(checkpoint or run.model), version, Sessions.load(run.sessions("test")), users,
                            beam)
        typer.echo(json.dumps({"version": str(version), **report.as_json()}))


@app.command()
@user_errors
def triton(
    model_repo: Annotated[Path, typer.Option("--model-repo", help="Triton model repository.")] = Path("model_repo"),
    http_port: Annotated[int, typer.Option(help="HTTP port (health, metadata, inference).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (what the gateway calls).")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    workdir: Annotated[Path, typer.Option(help="Backend links and the server log go here.")] = Path(
        "runs/triton"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 300.0,
) -> None:
    """Run the real tritonserver (from the nvidia-pytriton wheel) on MODEL_REPO until interrupted."""
    import signal
    import time

    from stack.triton import TritonPorts, TritonServer

    server = TritonServer(model_repo, workdir, TritonPorts(http_port, grpc_port, metrics_port), host)
    try:
        server.start(timeout)
    except RuntimeError as e:
        raise UsageError(str(e).splitlines()[0] + f" (log: {server.log_path})") from e
    typer.echo(f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  log {server.log_path}")
    (server.workdir / "tritonserver.pid").write_text(f"{server.process.pid}\n")  # `onerec down`'s last resort
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        while not stop["now"] and server.alive():
            time.sleep(0.5)
    finally:
        code = server.stop()
    if not stop["now"]:
        raise UsageError(f"tritonserver exited on its own with {code} (log: {server.log_path})")


class RedisModeChoice(str, Enum):
    standalone = "standalone"
    cluster = "cluster"


RedisModeOption = Annotated[RedisModeChoice, typer.Option(
    envvar="ONEREC_REDIS_MODE", help="standalone: one Redis; cluster: a Redis Cluster, --redis-url one seed node.")]


class HistorySplit(str, Enum):
    latest = "latest"
    test = "test"


@app.command("load-histories")
@user_errors
def load_histories(
    run_dir: RunOption,
    redis_url: Annotated[str, typer.Option(envvar="ONEREC_REDIS_URL", help="Redis to write to.")] = (
        "redis://127.0.0.1:6379/0"),
    redis_mode: RedisModeOption = RedisModeChoice.standalone,
    prefix: Annotated[str, typer.Option(
        envvar="ONEREC_HISTORY_PREFIX", help="History key prefix (keys are PREFIX{user_id}, braces included).")] = (
        "onerec:history:"),
    cap: Annotated[int, typer.Option(envvar="ONEREC_HISTORY_LEN", help="Videos kept per user.")] = 256,
    which: Annotated[HistorySplit, typer.Option(
        "--histories", help="latest: every positive up to now (what production holds); test: the test sessions' "
                            "histories, so /recommend can be scored against the held-out targets.")
    ] = HistorySplit.latest,
    batch: Annotated[int, typer.Option(help="Users per pipelined round trip (one atomic script per user).")] = 500,
    users_out: Annotated[Path | None, typer.Option(
        help="Also write the loaded user ids here, one per line (what the load tests draw from).")] = None,
    videos_out: Annotated[Path | None, typer.Option(
        help="Also write the run catalog's video ids here, most popular first (what the load tests post).")] = None,
) -> None:
    """Replace the users' Redis histories with the run's (most recent first); prints a JSON summary."""
    import time

    from tqdm import tqdm

    from onerec.data.interactions import Interactions
    from onerec.data.sessions import Sessions, latest_histories
    from service.history import REDIS_ERRORS, bulk_load, connect

    if cap < 1 or batch < 1:
        raise UsageError(f"--cap and --batch must be >= 1, got {cap} and {batch}")
    _check_prefix(prefix)
    run = RunDir(run_dir)
    run.require("prepare")
    if which is HistorySplit.latest:
        positive = float(run.read_marker("prepare")["data"]["positive_rating"])
        histories = [(str(u), h.tolist()) for u, h in latest_histories(Interactions.load(run.interactions),
                                                                          positive, cap)]
    else:
        test = Sessions.load(run.sessions("test"))
        histories = [(str(int(test.users[i])), test.history_of(i).tolist()) for i in range(len(test))]
    start = time.perf_counter()
    try:
        client = connect(redis_url, redis_mode.value)
    except REDIS_ERRORS as e:
        raise UsageError(f"--redis-url {redis_url} ({redis_mode.value}): {e}") from e
    try:
        with tqdm(total=len(histories), unit="user", disable=not progress(), desc="load-histories") as bar:
            users, videos = bulk_load(client, histories, prefix, cap, batch, bar.update)
    except REDIS_ERRORS as e:
        raise UsageError(f"--redis-url {redis_url} ({redis_mode.value}): {e}") from e
    finally:
        client.close()
    seconds = time.perf_counter() - start
    if users_out is not None:
        users_out.parent.mkdir(parents=True, exist_ok=True)
        users_out.write_text("".join(f"{user}\n" for user, _ in histories))
    if videos_out is not None:
        from onerec.tokenizer.catalog import Catalog

        catalog = Catalog.load(run.catalog)
        videos_out.parent.mkdir(parents=True, exist_ok=True)
        videos_out.write_text("".join(f"{int(v)}\n" for v in catalog.video_ids[catalog.popular_order]))
    log.info("loaded %d histories (%d videos) into %s in %.1fs", users, videos, redis_url, seconds)
    typer.echo(json.dumps({"users": users, "videos": videos, "histories": which.value, "seconds": round(seconds, 2)}))


def _check_prefix(prefix: str) -> None:
    if "{" in prefix or "}" in prefix:
        raise UsageError(f"--prefix {prefix!r}: must not contain {{ or }} (the key's hash tag follows it)")


@app.command("migrate-histories")
@user_errors
def migrate_histories(
    redis_url: Annotated[str, typer.Option(envvar="ONEREC_REDIS_URL", help="The standalone Redis to migrate.")] = (
        "redis://127.0.0.1:6379/0"),
    prefix: Annotated[str, typer.Option(envvar="ONEREC_HISTORY_PREFIX", help="History key prefix.")] = (
        "onerec:history:"),
    cap: Annotated[int, typer.Option(envvar="ONEREC_HISTORY_LEN", help="Videos kept per user.")] = 256,
    batch: Annotated[int, typer.Option(help="Keys per SCAN step and pipelined round trip.")] = 500,
) -> None:
    """Move histories stored before hash-tagged keys (PREFIX196) to PREFIX{196}, merged with what the new key
    already holds (its videos first: they are newer), one atomic script per user; prints a JSON summary.
    Idempotent: run it before deploying a gateway with hash-tagged keys and once more after the last old one."""
    from service.history import REDIS_ERRORS, connect, migrate_history_keys

    if cap < 1 or batch < 1:
        raise UsageError(f"--cap and --batch must be >= 1, got {cap} and {batch}")
    _check_prefix(prefix)
    try:
        client = connect(redis_url)
        users, videos = migrate_history_keys(client, prefix, cap, batch)
    except REDIS_ERRORS as e:
        raise UsageError(f"--redis-url {redis_url}: {e}") from e
    typer.echo(json.dumps({"users": users, "videos": videos}))


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the gateway (FastAPI under uvicorn). Settings come from ONEREC_* variables (see service/settings.py)."""
    import os
    import tempfile

    import uvicorn

    from service.settings import Settings

    if workers < 1:
        raise UsageError(f"--workers: must be >= 1, got {workers}")
    try:
        settings = Settings()
    except ValueError as e:
        raise UsageError(f"ONEREC_* settings: {e}") from e
    made_metrics_dir = workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if made_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="onerec-metrics-")
    log.info("gateway on http://%s:%d (%d worker(s)); triton %s, redis %s", host, port, workers,
             settings.triton_url, settings.redis_url)
    try:
        uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=10, http=DRAINING_HTTP)
    finally:
        if made_metrics_dir:  # the workers' metric files die with them
            import shutil

            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


