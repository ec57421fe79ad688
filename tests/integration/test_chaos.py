"""`python -m loadtest.chaos` reduced: its own stack (real Redis Cluster 3x1, tritonserver, the gateway under uvicorn),
real locust for a few seconds, a Triton hang, a Redis master SIGKILL and a rolling restart of the gateway's two
workers; the report's shape, no failed /recommend in the restart, no acknowledged event missing from Redis
afterwards, and the stack stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FAULTS = ("triton-hang", "redis-failover", "gateway-restart")
RUN_TIMEOUT_S = 600  # the harness's own bounds: onerec up, the load + 60 s, onerec down


def test_chaos_harness_reduced(tiny_run: Path, exported_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    doc = tmp_path / "RELIABILITY.md"
    command = [sys.executable, "-m", "loadtest.chaos", "--run", str(tiny_run), "--model-repo", str(exported_repo),
               "--out", str(out), "--faults", ",".join(FAULTS), "--users", "2", "--warmup-s", "4", "--gap-s", "8",
               "--hang-s", "2", "--triton-replicas", "1", "--doc", str(doc)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode in (0, 3), f"chaos failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    report = json.loads((out / "chaos.json").read_text())

    assert [row["fault"] for row in report["faults"]] == list(FAULTS)
    for row in report["faults"]:
        assert row["requests"] > 0, row
        assert set(row["endpoints"]) == {"/recommend", "/events"}
        assert row["p99_ms"] is not None
        assert row["recover_s"] is not None, f"{row['fault']}: answers never came back within the window: {row}"
        assert row["failures"] == row["endpoints"]["/recommend"]["failures"] + row["endpoints"]["/events"]["failures"]
    hang, failover, restart = report["faults"]
    assert hang["cleared_after_s"] >= 2.0  # SIGSTOPped for --hang-s
    assert failover["detail"]["rejoined_as"] == "slave"  # the killed master came back as its replica's replica
    assert restart["detail"]["mode"] == "rolling (SIGHUP)" and len(restart["detail"]["new_workers"]) == 2
    assert not set(restart["detail"]["new_workers"]) & set(restart["detail"]["old_workers"]), restart["detail"]
    assert restart["endpoints"]["/recommend"]["failures"] == 0, restart  # each new worker served before an old retired

    events = report["events"]
    assert events["acknowledged"] > 0, "no /events was acknowledged: the check below would prove nothing"
    assert events["acknowledged_unchecked"] == 0
    assert events["missing"] == 0, f"acknowledged events lost: {events['missing_examples']}"
    assert (done.returncode == 3) == any(row["endpoints"]["/recommend"]["failures"] for row in report["faults"])

    table = doc.read_text()
    assert all(f"| {fault} |" in table for fault in FAULTS) and "python -m loadtest.chaos" in table
    assert not (out / "stack" / "stack.json").exists(), "the harness left its stack running"
