"""The runner's process handling: a hard wall-clock bound, locust's exit code, an unreachable gateway."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from loadtest.run import LoadTestError, check_reachable, main, run_loadtest, run_locust, start_locust, stop_group


def test_run_locust_stops_a_process_past_its_bound(tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(LoadTestError, match="ran past 0.5 s"):
        run_locust([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, timeout_s=0.5)
    assert time.monotonic() - start < 10


def test_the_graceful_sigint_reaches_locust_even_from_a_parent_that_ignores_it(tmp_path: Path):
    """A parent started in a script's background ignores SIGINT; the child gets it back at its default, so
    stop_group's first signal (locust's graceful stop) ends it instead of the SIGTERM after TERM_WAIT_S."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = start_locust([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    stop_group(process)
    assert process.returncode in (-signal.SIGINT, 1)  # killed by SIGINT, or KeyboardInterrupt's exit status


def test_run_locust_reports_a_failed_exit_with_its_output(tmp_path: Path):
    with pytest.raises(LoadTestError, match="code 3") as error:
        run_locust([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path, timeout_s=30)
    assert "boom" in str(error.value)
    assert "boom" in (tmp_path / "locust.log").read_text()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_gateway_is_refused_before_locust_starts(tmp_path: Path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(LoadTestError, match="nothing answers"):
        check_reachable(url, timeout_s=2)
    (tmp_path / "u.txt").write_text("1\n")
    (tmp_path / "v.txt").write_text("1\n")
    with pytest.raises(LoadTestError, match="nothing answers"):
        run_loadtest(url, tmp_path / "u.txt", tmp_path / "v.txt", tmp_path / "out", "1x1")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LoadTestError, match="no such file"):
        run_loadtest(url, tmp_path / "missing.txt", tmp_path / "v.txt", tmp_path / "out", "1x1")


def test_cli_exit_code_when_locust_cannot_run(tmp_path: Path):
    (tmp_path / "u.txt").write_text("1\n")
    (tmp_path / "v.txt").write_text("1\n")
    args = ["--url", f"http://127.0.0.1:{closed_port()}", "--users-file", str(tmp_path / "u.txt"), "--videos-file",
            str(tmp_path / "v.txt"), "--out", str(tmp_path / "out"), "--steps", "1x1"]
    assert main(args) == 1
    assert main(["--run", str(tmp_path / "no-run")]) == 1
