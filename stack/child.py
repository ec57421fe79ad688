"""A local server run as a child process in its own session (tritonserver, redis-server, the gateway): start, stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from stack.probes import kill_group_leftovers

logger = logging.getLogger(__name__)


class ChildProcess:
    """Base of the local server launchers: `process` started with start_new_session=True, output in `log_path`."""

    name = "child"
    process: subprocess.Popen | None = None
    log_path: Path

    def spawn(self, command: list[str], env: dict[str, str] | None = None, log_output: bool = True) -> None:
        """Start `command` in its own session, its output appended to `log_path` (or discarded)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if not log_output:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            return
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, ready: Callable[[], bool], timeout: float, poll: float = 0.2,
                   detail: Callable[[], str] | None = None) -> None:
        """Return once `ready()` holds; RuntimeError (with the log's tail) if the process exits first, or, after
        stopping it, if `timeout` seconds pass."""
        assert self.process is not None, "spawn first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if ready():
                logger.info("%s ready (log: %s)", self.name, self.log_path)
                return
            time.sleep(poll)
        why = f" ({detail()})" if detail is not None else ""
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s{why}:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the process group (after SIGCONT, in case it was paused), SIGKILL after `timeout`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if kill_group_leftovers(self.process.pid):  # e.g. a SIGKILLed tritonserver's backend stubs
            logger.warning("%s had exited; killed the processes its group left behind", self.name)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc: object) -> None:
        self.stop()
