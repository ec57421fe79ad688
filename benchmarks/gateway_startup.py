"""One gateway worker's start-up time and resident memory: `onerec serve` today beside a peer that imports torch.

    .venv/bin/python benchmarks/gateway_startup.py --json                       # 5 interleaved rounds
    .venv/bin/python benchmarks/gateway_startup.py --before /tmp/before --json  # + an older checkout's `onerec serve`

Each round starts every variant once, in turn, as `onerec serve --workers 1` under this interpreter (uvicorn runs
the app in that one process), with the gateway's dependencies absent (Redis and Triton on closed ports, an empty
model repository: the gateway comes up degraded, which is what a worker pays before any traffic). It measures the
seconds from spawn to the first `GET /healthz` 200 and, at that moment, the process's VmRSS and whether libtorch is
mapped into it. Variants:
  serve         `python -m cli serve` (this tree)
  serve+torch   the same command with `import torch` first: what every worker paid while `onerec serve` lived in
                the library and imported torch at start-up
  before        `python -m onerec.cli serve` from `--before DIR`, a checkout of an older commit (optional)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from stack.probes import free_ports, http_ok

log = logging.getLogger("gateway_startup")
TORCH_FIRST = ("import runpy, sys, torch; sys.argv = ['onerec', *sys.argv[1:]]; "
               "runpy.run_module('cli', run_name='__main__')")


@dataclass(frozen=True)
class Variant:
    """How to launch one gateway: the command before `serve ...`, extra environment, working directory."""

    prefix: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # `python -m` puts the working directory first on the path


def variants(before: Path | None) -> dict[str, Variant]:
    found = {"serve": Variant([sys.executable, "-m", "cli"]),
             "serve+torch": Variant([sys.executable, "-c", TORCH_FIRST])}
    if before is not None:
        old = before.resolve()
        found["before"] = Variant([sys.executable, "-m", "onerec.cli"], {"PYTHONPATH": str(old)}, old)
    return found


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"pid {pid}: no VmRSS")


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def start_once(variant: Variant, repo: Path, timeout: float = 120.0) -> dict:
    """Spawn one gateway, wait for /healthz, measure, stop it."""
    port, redis_port, grpc_port = free_ports(3)
    env = {**os.environ, **variant.env, "ONEREC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "ONEREC_TRITON_URL": f"127.0.0.1:{grpc_port}", "ONEREC_MODEL_REPO": str(repo), "PYTHONUNBUFFERED": "1"}
    command = [*variant.prefix, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--log-level", "warning"]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=variant.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        while not http_ok(f"http://127.0.0.1:{port}/healthz", timeout=0.5):
            if process.poll() is not None or time.perf_counter() - start > timeout:
                raise RuntimeError(f"{command}: no /healthz (exit {process.poll()})")
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "rss_mib": rss_mib(process.pid), "torch_loaded": maps_torch(process.pid)}
    finally:
        process.terminate()
        process.wait(30)


def summarise(samples: list[dict]) -> dict:
    return {"startup_s_median": round(statistics.median(s["seconds"] for s in samples), 3),
            "startup_s_min": round(min(s["seconds"] for s in samples), 3),
            "rss_mib_median": round(statistics.median(s["rss_mib"] for s in samples), 1),
            "torch_loaded": all(s["torch_loaded"] for s in samples), "rounds": len(samples)}


def main(
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (each starts every variant once).")] = 5,
    before: Annotated[Path | None, typer.Option(help="An older checkout whose `onerec.cli serve` to time too.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    chosen = variants(before)
    samples: dict[str, list[dict]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as repo:
        for r in range(rounds):
            for name, variant in chosen.items():
                samples[name].append(start_once(variant, Path(repo)))
                log.info("round %d %-12s %.2fs %.0f MiB", r + 1, name, samples[name][-1]["seconds"],
                         samples[name][-1]["rss_mib"])
    result = {name: summarise(s) for name, s in samples.items()}
    peer = "before" if "before" in result else "serve+torch"
    result["ratios"] = {
        f"{peer}/serve startup": round(result[peer]["startup_s_median"] / result["serve"]["startup_s_median"], 2),
        f"{peer}/serve rss": round(result[peer]["rss_mib_median"] / result["serve"]["rss_mib_median"], 2)}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    for name in chosen:
        log.info("%-12s startup %.2fs (median of %d)  RSS %.0f MiB  torch loaded: %s", name,
                 result[name]["startup_s_median"], rounds, result[name]["rss_mib_median"], result[name]["torch_loaded"])
    if as_json:
        typer.echo(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
