"""What the gateway adds on top of the model: end-to-end HTTP latency vs Triton's own time, at concurrency 1.

    .venv/bin/python benchmarks/gateway_overhead.py --json                 # ml-100k run, beam 128, 200 requests
    .venv/bin/python benchmarks/gateway_overhead.py --quick --json         # beam 16, 40 requests

Starts the real stack on loopback (redis-server, tritonserver over a fresh fp32 export of --run, the gateway in
uvicorn), loads the run's histories into Redis, then sends requests one at a time, alternating two paths for the
same users: `POST /recommend` through the gateway (Redis read, SID mapping, gRPC to Triton, inverted index,
backfill, JSON) and the peer, a direct gRPC `infer` of the same history SIDs from this process.
Overhead, per request: e2e minus the gateway's own gRPC call to Triton (its `Server-Timing: triton` stage), i.e.
everything the gateway adds around the backend. Also reported: e2e minus Triton's statistics for that request
(queue + compute, read before and after it, exact at concurrency 1), which also counts Triton's gRPC frontend
and Python-backend IPC. `--json` prints one JSON object last.
"""

from __future__ import annotations

import http.client
import json
import logging
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import tritonclient.grpc as grpcclient
import typer

from export.repository import export_run
from onerec.data.interactions import Interactions
from onerec.data.sessions import latest_histories
from onerec.runs import RunDir
from onerec.tokenizer.catalog import Catalog
from service.history import bulk_load
from stack.gateway import GatewayProcess
from stack.probes import free_ports
from stack.redis_server import RedisServer
from stack.triton import TritonPorts, TritonServer

log = logging.getLogger("gateway_overhead")
STAT_FIELDS = ("queue", "compute_input", "compute_infer", "compute_output")


def triton_ns(client: grpcclient.InferenceServerClient) -> dict[str, int]:
    """Cumulative Triton time (ns) per phase and the success count for model onerec."""
    stats = client.get_inference_statistics("onerec").model_stats
    out = {"success": 0, **{f: 0 for f in STAT_FIELDS}}
    for model in stats:
        inference = model.inference_stats
        out["success"] += inference.success.count
        for f in STAT_FIELDS:
            out[f] += getattr(inference, f).ns
    return out


def settled(client: grpcclient.InferenceServerClient, success: int, timeout: float = 2.0) -> dict[str, int]:
    """Triton's statistics once they count `success` requests (it updates them just after responding)."""
    deadline = time.monotonic() + timeout
    stats = triton_ns(client)
    while stats["success"] < success and time.monotonic() < deadline:
        time.sleep(0.001)
        stats = triton_ns(client)
    return stats


def direct_infer(client: grpcclient.InferenceServerClient, sids: np.ndarray, beam: int, sessions: int) -> None:
    arrays = [("HISTORY_SIDS", sids[None].astype(np.int32), "INT32"),
              ("BEAM_WIDTH", np.array([[beam]], np.int32), "INT32"),
              ("NUM_SESSIONS", np.array([[sessions]], np.int32), "INT32"),
              ("EXCLUDE_HISTORY", np.array([[True]]), "BOOL")]
    inputs = []
    for name, array, dtype in arrays:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client.infer("onerec", inputs, client_timeout=60)


def server_timing(header: str) -> dict[str, float]:
    """`redis;dur=0.3, triton;dur=150.2` -> {"redis": 0.3, "triton": 150.2} (ms)."""
    out = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, dur = part.partition(";dur=")
        out[name] = float(dur)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(
    run: Annotated[Path, typer.Option(help="A trained run directory (`make demo` builds runs/ml-100k).")] = Path(
        "runs/ml-100k"),
    requests: Annotated[int, typer.Option(help="Timed requests per path.")] = 200,
    warmup: Annotated[int, typer.Option(help="Untimed requests per path first.")] = 10,
    beam_width: Annotated[int, typer.Option(help="Beam width the gateway asks for.")] = 128,
    num_sessions: Annotated[int, typer.Option(help="Sessions asked for (backfill pool).")] = 16,
    quick: Annotated[bool, typer.Option("--quick", help="beam 16, 40 requests, 3 warm-up.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Measure the gateway's overhead over Triton at concurrency 1 (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the servers this run started
    if quick:
        requests, warmup, beam_width = 40, 3, 16
    rundir = RunDir(run)
    rundir.require("train")
    with tempfile.TemporaryDirectory(prefix="gateway-overhead-") as tmp:
        work = Path(tmp)
        version = export_run(run, work / "repo", "fp32")
        catalog = Catalog.load(version)
        positive = float(rundir.read_marker("prepare")["data"]["positive_rating"])
        histories = [(str(u), h.tolist()) for u, h in
                     latest_histories(Interactions.load(rundir.interactions), positive, 256)]
        redis_port, gw_port, *ports = free_ports(5)
        with RedisServer(work / "redis", redis_port) as redis_server, \
                TritonServer(work / "repo", work / "triton", TritonPorts(*ports)) as triton:
            import redis

            bulk_load(redis.Redis.from_url(redis_server.url), histories, "onerec:history:", 256)
            settings = {"ONEREC_REDIS_URL": redis_server.url, "ONEREC_TRITON_URL": triton.grpc_url,
                        "ONEREC_MODEL_REPO": str(work / "repo"), "ONEREC_BEAM_WIDTH": str(beam_width),
                        "ONEREC_NUM_SESSIONS": str(num_sessions), "ONEREC_TRITON_TIMEOUT_S": "60"}
            with GatewayProcess(gw_port, settings, work / "gateway.log") as gateway:
                result = measure(gateway.port, triton.grpc_url, catalog, histories, requests, warmup, beam_width,
                                 num_sessions)
    result.update(run=str(run), beam_width=beam_width, num_sessions=num_sessions, requests=requests,
                  machine=f"{platform.machine()} {platform.processor() or ''} {_cpus()} CPUs".strip())
    report(result)
    if as_json:
        typer.echo(json.dumps(result))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def measure(port: int, grpc_url: str, catalog: Catalog, histories: list[tuple[str, list[int]]], requests: int,
            warmup: int, beam: int, sessions: int) -> dict:
    """Alternate gateway and direct requests over the same users; per-request Triton time from its statistics."""
    rng = np.random.default_rng(0)
    users = [histories[i] for i in rng.choice(len(histories), size=requests + warmup, replace=True)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    stats_client = grpcclient.InferenceServerClient(grpc_url)
    direct_client = grpcclient.InferenceServerClient(grpc_url)
    e2e, triton_ms, queue_ms, direct, sources, call_ms = [], [], [], [], [], []
    for i, (user, history) in enumerate(users):
        sids = catalog.known_sids(history)[:256]
        before = triton_ns(stats_client)
        start = time.perf_counter()
        conn.request("POST", "/recommend", json.dumps({"user_id": user}), {"content-type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        elapsed = time.perf_counter() - start
        stages = server_timing(response.getheader("server-timing", ""))
        assert response.status == 200, body
        called = body["source"] == "model" or body["fallback_reason"] not in ("cold_start", "redis_unavailable")
        after = settled(stats_client, before["success"] + int(called))
        start = time.perf_counter()
        if len(sids):
            direct_infer(direct_client, sids, beam, sessions)
        direct_elapsed = time.perf_counter() - start
        if len(sids):
            settled(stats_client, after["success"] + 1)
        if i < warmup:
            continue
        sources.append(body["source"])
        if after["success"] - before["success"] != 1:
            continue  # a fallback answer (Triton not called): no Triton time to subtract
        e2e.append(elapsed * 1e3)
        call_ms.append(stages["triton"])
        triton_ms.append(sum(after[f] - before[f] for f in STAT_FIELDS) / 1e6)
        queue_ms.append((after["queue"] - before["queue"]) / 1e6)
        direct.append(direct_elapsed * 1e3)
    conn.close()
    overhead = [a - b for a, b in zip(e2e, call_ms, strict=True)]
    over_compute = [a - b for a, b in zip(e2e, triton_ms, strict=True)]
    over_direct = [a - b for a, b in zip(e2e, direct, strict=True)]
    return {
        "e2e_ms_p50": statistics.median(e2e), "e2e_ms_p99": percentile(e2e, 99),
        "triton_call_ms_p50": statistics.median(call_ms),
        "triton_ms_p50": statistics.median(triton_ms), "triton_queue_ms_p50": statistics.median(queue_ms),
        "direct_grpc_ms_p50": statistics.median(direct),
        "overhead_ms_p50": statistics.median(overhead), "overhead_ms_p90": percentile(overhead, 90),
        "overhead_vs_triton_stats_ms_p50": statistics.median(over_compute),
        "overhead_vs_direct_ms_p50": statistics.median(over_direct),
        "e2e_over_direct": statistics.median(e2e) / statistics.median(direct),
        "model_answers": sources.count("model"), "fallback_answers": len(sources) - sources.count("model"),
        "timed": len(e2e),
    }


def report(r: dict) -> None:
    lines = [
        f"gateway overhead, concurrency 1, beam {r['beam_width']}, {r['timed']} requests ({r['machine']})",
        f"  end-to-end HTTP p50        {r['e2e_ms_p50']:9.2f} ms   p99 {r['e2e_ms_p99']:.2f} ms",
        f"  gateway's Triton call p50  {r['triton_call_ms_p50']:9.2f} ms   (gRPC round trip, Server-Timing)",
        f"  overhead e2e - call p50    {r['overhead_ms_p50']:9.2f} ms   p90 {r['overhead_ms_p90']:.2f} ms (goal <= 5)",
        f"  Triton's statistics p50    {r['triton_ms_p50']:9.2f} ms   (queue p50 {r['triton_queue_ms_p50']:.2f} ms)",
        f"  e2e - Triton statistics    {r['overhead_vs_triton_stats_ms_p50']:9.2f} ms   (adds Triton's gRPC frontend)",
        f"  peer: direct gRPC p50      {r['direct_grpc_ms_p50']:9.2f} ms   e2e / direct = {r['e2e_over_direct']:.3f}",
        f"  e2e - direct gRPC p50      {r['overhead_vs_direct_ms_p50']:9.2f} ms",
    ]
    for line in lines:
        log.info(line)


if __name__ == "__main__":
    typer.run(main)
