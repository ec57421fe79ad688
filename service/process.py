"""The gateway as a child process (`onerec serve` under uvicorn) on loopback: for tests, benchmarks and the stack."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from onerec.serving.child import ChildProcess
from service.commands import gateway_args, local_command

log = logging.getLogger(__name__)


def get_json(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    """(status, JSON body) of a GET; (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL we built)
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


class GatewayProcess(ChildProcess):
    """`python -m onerec.cli serve` with ONEREC_* settings from `env`; its output in `log_path`."""

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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = local_command(gateway_args(self.host, self.port, self.workers))
        env = {**os.environ, **self.settings, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}")
            path = "/readyz" if require_ready else "/healthz"
            status, body = get_json(self.url + path)
            if status == 200:
                log.info("gateway ready on %s", self.url)
                return self
            time.sleep(0.2)
        detail = get_json(self.url + "/readyz")[1]
        self.stop()
        raise RuntimeError(f"gateway not ready after {ready_timeout:.0f}s ({detail}):\n{self.log_tail()}")

    def __enter__(self) -> GatewayProcess:
        return self.start()

