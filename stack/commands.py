"""The stack's commands as argument lists: what `onerec up` runs locally and docker-compose.yml runs in containers."""

from __future__ import annotations

import sys

from stack.triton import TritonPorts


def triton_args(model_repo: str, host: str, workdir: str, ports: TritonPorts | None = None) -> list[str]:
    """`onerec triton ...`: the real tritonserver on MODEL_REPO (explicit model control, strict readiness)."""
    ports = ports or TritonPorts()
    return ["onerec", "triton", "--model-repo", model_repo, "--host", host, "--workdir", workdir,
            "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]


def gateway_args(host: str, port: int, workers: int = 1) -> list[str]:
    """`onerec serve ...`: the gateway under uvicorn; its settings come from ONEREC_* variables."""
    return ["onerec", "serve", "--host", host, "--port", str(port), "--workers", str(workers)]


def load_histories_args(run: str, redis_url: str, users_out: str | None = None,
                        videos_out: str | None = None) -> list[str]:
    """`onerec load-histories ...`: every user's latest history into Redis (a one-shot job), optionally writing
    the loaded user ids and the catalog's videos (most popular first) that the load tests draw from."""
    args = ["onerec", "load-histories", "--run", run, "--redis-url", redis_url]
    if users_out is not None:
        args += ["--users-out", users_out]
    if videos_out is not None:
        args += ["--videos-out", videos_out]
    return args


def local_command(args: list[str]) -> list[str]:
    """An `onerec ...` argument list run with this interpreter (the venv's, whatever PATH says)."""
    assert args[0] == "onerec", args
    return [sys.executable, "-m", "cli", *args[1:]]
