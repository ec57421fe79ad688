"""The gateway as a child process (`onerec serve` under uvicorn) on loopback: for tests, benchmarks and the stack."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from stack.child import ChildProcess
from stack.commands import gateway_args, local_command
from stack.probes import get_json, http_ok

log = logging.getLogger(__name__)


class GatewayProcess(ChildProcess):
    """`python -m cli serve` with ONEREC_* settings from `env`; its output in `log_path`."""

    def __init__(self, port: int, settings: dict[str, str], log_path: Path, host: str = "127.0.0.1",
                 workers: int = 1) -> None:
        self.port, self.settings, self.log_path, self.host, self.workers = port, settings, Path(log_path), host, workers
        self.process: subprocess.Popen | None = None
        self.name = "gateway"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 60.0, require_ready: bool = True) -> GatewayProcess:
        """Start; return once /healthz answers (and /readyz says ready when `require_ready`)."""
        command = local_command(gateway_args(self.host, self.port, self.workers))
        self.spawn(command, env={**os.environ, **self.settings, "PYTHONUNBUFFERED": "1"})
        path = "/readyz" if require_ready else "/healthz"
        self.wait_ready(lambda: http_ok(self.url + path), ready_timeout,
                        detail=lambda: str(get_json(self.url + "/readyz")[1]))
        log.info("gateway ready on %s", self.url)
        return self

    def __enter__(self) -> GatewayProcess:
        return self.start()

