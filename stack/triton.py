"""Local Triton Inference Server: the real `tritonserver` shipped in the nvidia-pytriton wheel (DESIGN.md §6).

Assembles a backend directory for the running Python (the wheel's Python backend and the stub built for
this Python version), starts the server on loopback with our model repository, waits for readiness and
stops it cleanly. Imports nothing from Triton's Python packages: readiness is plain HTTP.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from onerec.errors import UsageError
from onerec.serving import layout
from stack.child import ChildProcess
from stack.probes import http_ok

logger = logging.getLogger(__name__)


# --exit-timeout-secs: how long Triton drains in-flight requests on SIGTERM (compose's stop_grace_period exceeds it).
EXIT_TIMEOUT_S = 30


# Replica i of `onerec up --triton-replicas N` listens on each port + REPLICA_PORT_STRIDE * i (8010-8012, ...).
REPLICA_PORT_STRIDE = 10


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def replica(self, index: int) -> TritonPorts:
        """The ports of replica `index` (0: these): each port plus REPLICA_PORT_STRIDE * index."""
        step = REPLICA_PORT_STRIDE * index
        return TritonPorts(self.http + step, self.grpc + step, self.metrics + step)


def wheel_root() -> Path:
    """pytriton/tritonserver inside the installed nvidia-pytriton wheel."""
    spec = find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise UsageError("tritonserver: the nvidia-pytriton package is not installed (run `make install`)")
    root = Path(spec.origin).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise UsageError(f"{root}/bin/tritonserver: not found in the nvidia-pytriton wheel")
    return root


def backend_directory(workdir: Path) -> Path:
    """`workdir/backends` with a `python` backend linked from the wheel, using the stub for this Python."""
    root = wheel_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UsageError(f"{stub}: no Python backend stub for Python {version} in the nvidia-pytriton wheel")
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (root / "backends" / "python" / "libtriton_python.so",
                   root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = python / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return workdir / "backends"


def server_env() -> dict[str, str]:
    """The stub embeds this Python: it needs libpython on the library path and our packages on sys.path."""
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = ":".join(p for p in dict.fromkeys([*paths, *env.get("PYTHONPATH", "").split(":")]) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def server_command(model_repo: Path, backends: Path, ports: TritonPorts, host: str = "127.0.0.1",
                   exit_timeout: int = EXIT_TIMEOUT_S) -> list[str]:
    """The tritonserver command line; the Docker image runs the same flags with its own binary."""
    return [
        str(wheel_root() / "bin" / "tritonserver"),
        f"--model-repository={model_repo}",
        f"--backend-directory={backends}",
        # explicit: what Triton serves changes only when `onerec deploy|rollback|promote` call its repository API
        "--model-control-mode=explicit",
        f"--load-model={layout.MODEL_NAME}",
        "--strict-readiness=true",
        f"--exit-timeout-secs={exit_timeout}",
        f"--http-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        "--log-verbose=0",
    ]


class TritonServer(ChildProcess):
    """One tritonserver process serving `model_repo`, its log in `workdir/tritonserver.log`."""

    def __init__(self, model_repo: Path, workdir: Path, ports: TritonPorts | None = None,
                 host: str = "127.0.0.1") -> None:
        self.model_repo = Path(model_repo).resolve()
        self.workdir = Path(workdir)
        self.ports = ports or TritonPorts()
        self.host = host
        self.log_path = self.workdir / "tritonserver.log"
        self.name = "tritonserver"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start the server and return once /v2/health/ready answers 200 (every model loaded)."""
        if not (layout.model_dir(self.model_repo) / layout.CONFIG_FILE).is_file():
            raise UsageError(f"{self.model_repo}: no onerec/config.pbtxt; run `onerec export` first")
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = server_command(self.model_repo, backend_directory(self.workdir), self.ports, self.host)
        logger.info("starting tritonserver (log: %s)", self.log_path)
        self.spawn(command, env=server_env())
        self.wait_ready(lambda: http_ok(f"{self.http_url}/v2/health/ready"), timeout, poll=0.25)
        logger.info("tritonserver ready: http %s, grpc %s", self.http_url, self.grpc_url)
        return self

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL after `timeout`; the exit code."""
        return super().stop(timeout)

    def __enter__(self) -> TritonServer:
        return self.start()

