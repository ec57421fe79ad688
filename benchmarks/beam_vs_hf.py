"""Beam-128 session generation: our serving engine vs HuggingFace `generate`, plus trie cost, beam sweep,
Triton batching and the decode step's FLOP floor — one run, one machine.

    .venv/bin/python benchmarks/beam_vs_hf.py --json            # full run (1M items, K=8192)
    .venv/bin/python benchmarks/beam_vs_hf.py --quick --json    # reduced run, under 3 minutes

Ours: the exported ONNX encoder + KV-cached decoder in onnxruntime driving the library's trie-constrained beam
search (exactly what the Triton backend runs), on a random-weight OneRec model of --dims over a synthetic
catalog. Peer: `transformers` T5 (dense, same d_model / heads / layers; d_ff = top_k x the expert width, so
both run the same active FFN FLOPs per token) fed the same history `inputs_embeds`, `num_beams` = the beam,
with as many decode steps as ours (m x (L+1) - 1). Both random-weight: latency does not depend on training.
Results: a table on stderr, `--out`/beam_vs_hf.json and a latency-vs-beam PNG; `--json` prints the JSON last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnxruntime as ort
import torch
import typer

from export.repository import ServingConfig, write_version
from onerec.config import ModelConfig
from onerec.model.onerec import OneRecModel
from onerec.serving.engine import Engine, Query
from onerec.tokenizer.catalog import Catalog
from stack.probes import free_ports
from stack.triton import TritonPorts, TritonServer

log = logging.getLogger("beam_vs_hf")
LEVELS, SESSION, HISTORY = 3, 5, 256


@dataclass(frozen=True)
class Dims:
    """Architecture shared by ours and the peer."""

    d_model: int
    n_heads: int
    encoder_layers: int
    decoder_layers: int
    d_ff: int  # per expert (ours); the peer's dense FFN is top_k * d_ff wide
    n_experts: int
    top_k: int


DIMS = {
    "quick": Dims(256, 4, 2, 2, 512, 8, 2),
    "bench": Dims(512, 8, 4, 4, 1024, 8, 2),  # what a 2-core CPU runs in minutes
    "paper": Dims(1024, 16, 6, 6, 4096, 24, 2),  # the paper preset: for a GPU machine
}


@dataclass(frozen=True)
class Plan:
    items: int
    codes: int
    dims: str
    repeats: int
    beams: tuple[int, ...]
    concurrency: tuple[int, ...]
    requests_per_client: int


def synthetic_catalog(items: int, codes: int, seed: int) -> Catalog:
    """A balanced L=3 codebook over `items` videos: every code of every level holds floor or ceil(N/K)
    items, codes drawn independently per level (the trie shape balanced residual k-means produces; the
    tokenizer itself is benchmarked in tokenizer_scale.py)."""
    rng = np.random.default_rng(seed)
    sids = np.stack([rng.permutation(items) % codes for _ in range(LEVELS)], axis=1).astype(np.int32)
    popularity = rng.zipf(1.3, items).clip(max=10**6)
    return Catalog.build(np.arange(items, dtype=np.int64), sids, popularity, codes)


def model_config(dims: Dims, codes: int) -> ModelConfig:
    return ModelConfig(codes=codes, levels=LEVELS, history_len=HISTORY, session_len=SESSION, d_model=dims.d_model,
                       n_heads=dims.n_heads, encoder_layers=dims.encoder_layers, decoder_layers=dims.decoder_layers,
                       d_ff=dims.d_ff, n_experts=dims.n_experts, top_k=dims.top_k, dropout=0.0)


def histories(catalog: Catalog, count: int, seed: int) -> list[np.ndarray]:
    """`count` full-length (256-item) histories of catalog SIDs."""
    rng = np.random.default_rng(seed + 1)
    return [catalog.sids[rng.integers(0, catalog.num_items, HISTORY)].astype(np.int64) for _ in range(count)]


def timed(fn, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - start))
    return out


def ours_latency(engine: Engine, query: Query, repeats: int, constrained: bool = True) -> list[float]:
    return timed(lambda: engine.generate([query], constrained=constrained), repeats)


def hf_peer(model: OneRecModel, dims: Dims):
    """A dense T5 of the same width/depth/heads with vocabulary K, and a function making its inputs."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = model.cfg
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=cfg.codes, d_model=dims.d_model, d_kv=dims.d_model // dims.n_heads, d_ff=dims.top_k * dims.d_ff,
        num_layers=dims.encoder_layers, num_decoder_layers=dims.decoder_layers, num_heads=dims.n_heads,
        dropout_rate=0.0, feed_forward_proj="gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()

    @torch.inference_mode()
    def embeds(history: np.ndarray) -> torch.Tensor:
        """The exact encoder input of our model: sum of level embeddings + position, (1, N, D)."""
        codes = torch.from_numpy(history)[None] + model.level_offsets  # (1, N, L)
        return model.item_emb(codes).sum(-2) + model.enc_pos(torch.arange(history.shape[0]))

    return t5, embeds


def hf_latency(t5, inputs: torch.Tensor, beam: int, steps: int, repeats: int) -> list[float]:
    mask = torch.ones(inputs.shape[:2], dtype=torch.long)

    @torch.inference_mode()
    def run() -> None:
        out = t5.generate(inputs_embeds=inputs, attention_mask=mask, num_beams=beam, max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False, early_stopping=False, length_penalty=0.0)
        assert out.shape[1] == steps + 1, out.shape  # decoder start + `steps` generated tokens

    return timed(run, repeats)


def matmul_peak(dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of square and decoder-shaped matmuls with torch's threads: the machine's practical peak."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 512, 1536), (128, 1024, 4096)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        ms = statistics.median(timed(lambda a=a, b=b: a @ b, 10))
        best = max(best, 2 * m * k * n / (ms / 1000) / 1e9)
    return best


def decode_step_flops(cfg: ModelConfig, beams: int, past: int, candidates: int) -> float:
    """FLOPs of one decode step for one request: `beams` rows at cache length `past` against 256 memory
    positions, the MoE running top_k experts per row, the head scoring `candidates` codes per row."""
    D, H, hd, N, T = cfg.d_model, cfg.n_heads, cfg.head_dim, HISTORY, past + 1
    per_row_layer = (
        2 * D * 3 * D + 2 * D * D  # self-attention qkv + out
        + 2 * 2 * H * T * hd  # self-attention scores + values
        + 2 * D * D * 2  # cross-attention q + out (its K/V are the request's, computed once)
        + 2 * 2 * H * N * hd  # cross-attention scores + values
        + 2 * D * cfg.n_experts  # gate
        + cfg.top_k * 2 * (2 * D * cfg.d_ff)  # top-k experts
    )
    return beams * (cfg.decoder_layers * per_row_layer + 2 * D * candidates)


def encoder_flops(cfg: ModelConfig, history: int) -> float:
    """FLOPs of one request's encoder pass over `history` items: dense pre-LN layers (qkv + out, scores +
    values, FFN), then the cross-attention K/V projection of every decoder layer."""
    D, N = cfg.d_model, history
    per_token_layer = 2 * D * 4 * D + 2 * 2 * N * D + 2 * 2 * D * cfg.d_ff
    return N * (cfg.encoder_layers * per_token_layer + cfg.decoder_layers * 2 * D * 2 * D)


def request_flops(cfg: ModelConfig, beams: int, children: tuple[int, ...]) -> float:
    """FLOPs of one request as the engine decodes it: the encoder once, then every position p of
    [BOS, s^1..s^L] x m - 1 for `beams` rows (one row at p = 0, where every beam is BOS on an empty cache),
    scoring children[level] candidates per row (children[0]: the root's codes; a position before a BOS
    scores one ignored candidate)."""
    L = len(children)
    total = encoder_flops(cfg, HISTORY)
    for p in range(cfg.session_len * (L + 1) - 1):
        level = (p + 1) % (L + 1) - 1  # level of the code at p+1; -1: p+1 is a BOS
        total += decode_step_flops(cfg, beams if p else 1, p, children[level] if level >= 0 else 1)
    return total


def engine_batching_gain(engine: Engine, hists: list[np.ndarray], beam: int, batch: int, repeats: int) -> dict:
    """Requests/s of the engine alone (no Triton) decoding 1 and `batch` requests in one beam search: what
    the dynamic batcher could gain at best on this machine."""
    queries = [engine.query(h, beam, 16) for h in hists[:batch]]
    one = statistics.median(timed(lambda: engine.generate(queries[:1]), repeats))
    many = statistics.median(timed(lambda: engine.generate(queries), max(1, repeats // 2)))
    return {"batch": batch, "qps_1": 1000 / one, f"qps_{batch}": 1000 * batch / many,
            "gain": (1000 * batch / many) / (1000 / one)}


def decode_step_time(engine: Engine, query: Query, beams: int, past: int, candidates: int, repeats: int,
                     shared: bool) -> float:
    """Median ms of one decoder.onnx call at cache length `past`: `candidates` codes shared by all beams
    when `shared` (level 0: the whole codebook), else a list of that many per beam (deeper levels)."""
    hist = query.history[None]
    mask = np.ones(hist.shape[:2], dtype=bool)
    rng = np.random.default_rng(0)
    step = engine.model.start(hist, mask, beams)
    tokens = torch.zeros(1, beams, dtype=torch.long)
    identity = torch.arange(beams).view(1, beams)
    for _ in range(past):  # grow the cache
        step(tokens, identity, torch.zeros(1, 1, 1, dtype=torch.long))
    cache = step.cache
    shape = (1, 1, candidates) if shared else (1, beams, candidates)
    cand = torch.from_numpy(rng.integers(0, engine.cfg.codes, shape))

    def one() -> None:
        step.cache = cache
        step(tokens, identity, cand)

    return statistics.median(timed(one, repeats))


def triton_throughput(repo: Path, workdir: Path, hists: list[np.ndarray], beam: int, concurrency: tuple[int, ...],
                      per_client: int) -> dict[str, Any]:
    """Requests/s through the real tritonserver at each concurrency (each client sends `per_client`
    requests back to back), and Triton's own count of batches executed."""
    import tritonclient.grpc as grpcclient

    def infer(client, history: np.ndarray) -> None:
        inputs = [grpcclient.InferInput("HISTORY_SIDS", [1, *history.shape], "INT32"),
                  grpcclient.InferInput("BEAM_WIDTH", [1, 1], "INT32")]
        inputs[0].set_data_from_numpy(history[None].astype(np.int32))
        inputs[1].set_data_from_numpy(np.array([[beam]], dtype=np.int32))
        client.infer("onerec", inputs, client_timeout=600)

    out: dict[str, Any] = {}
    with TritonServer(repo, workdir, TritonPorts(*free_ports(3))) as server:
        clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(max(concurrency))]
        infer(clients[0], hists[0])  # warm-up
        for c in concurrency:
            before = server_stats(clients[0])

            def client_loop(i: int, c: int = c) -> None:
                for r in range(per_client):
                    infer(clients[i], hists[(i * per_client + r) % len(hists)])

            start = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(client_loop, range(c)))
            seconds = time.perf_counter() - start
            time.sleep(1.0)  # Triton records an execution's statistics after its responses are sent
            after = server_stats(clients[0])
            requests = c * per_client
            inferences, batches = after[0] - before[0], after[1] - before[1]
            out[str(c)] = {"requests": requests, "seconds": round(seconds, 2), "qps": requests / seconds,
                           "avg_batch": inferences / batches if batches else None}
            log.info("triton concurrency %d: %.2f req/s (avg batch %.2f)", c, requests / seconds,
                     out[str(c)]["avg_batch"] or 0)
    return out


def server_stats(client) -> tuple[int, int]:
    """(inferences, executions) of the onerec model so far."""
    stats = client.get_inference_statistics("onerec").model_stats[0]
    return stats.inference_count, stats.execution_count


def plot(path: Path, sweep: dict[int, float], hf128: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    beams = sorted(sweep)
    ax.plot(beams, [sweep[b] for b in beams], "o-", label="ours (onnxruntime + trie beam search)")
    if hf128 is not None:
        ax.plot([128], [hf128], "s", color="tab:red", label="HF T5 generate, beam 128")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(beams, [str(b) for b in beams])
    ax.set_xlabel("beam width")
    ax.set_ylabel("median latency per request (ms)")
    ax.set_title("Session generation latency vs beam width")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}


def run(plan: Plan, out: Path, seed: int, skip_hf: bool, skip_triton: bool, precision: str) -> dict[str, Any]:
    dims = DIMS[plan.dims]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    catalog = synthetic_catalog(plan.items, plan.codes, seed)
    log.info("catalog: %d items, %d SIDs, K=%d (%.1fs)", catalog.num_items, catalog.num_leaves, plan.codes,
             time.perf_counter() - t0)
    model = OneRecModel(model_config(dims, plan.codes)).eval()
    hists = histories(catalog, 16, seed)
    result: dict[str, Any] = {"plan": asdict(plan), "dims": asdict(dims), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        version = write_version(model, catalog, repo, precision, f"bench-{plan.dims}", "random init",
                                ServingConfig(device="cpu", max_batch_size=max(plan.concurrency),
                                              max_queue_delay_us=20_000))
        engine = Engine(version, device="auto")
        query = engine.query(hists[0], 128, 16)
        steps = SESSION * (LEVELS + 1) - 1

        ours = ours_latency(engine, query, plan.repeats)
        free = ours_latency(engine, query, plan.repeats, constrained=False)
        result["ours_ms"] = ours
        result["ours_unconstrained_ms"] = free
        log.info("ours beam 128: median %.0f ms (unconstrained %.0f ms)", statistics.median(ours),
                 statistics.median(free))

        sweep = {}
        for beam in plan.beams:
            q = engine.query(hists[0], beam, min(16, beam))
            sweep[beam] = statistics.median(ours_latency(engine, q, plan.repeats))
            log.info("ours beam %d: %.0f ms", beam, sweep[beam])
        result["beam_sweep_ms"] = {str(b): v for b, v in sweep.items()}

        peak = matmul_peak()
        level1 = int(np.median(np.diff(catalog.trie.offsets[1])))  # typical children of a level-1 prefix
        for name, cands, shared in (("level0_full_head", plan.codes, True), ("level1_children", max(level1, 1), False)):
            ms = decode_step_time(engine, query, 128, steps // 2, cands, plan.repeats + 3, shared)
            flops = decode_step_flops(engine.cfg, 128, steps // 2, cands)
            result.setdefault("decode_step", {})[name] = {
                "candidates": cands, "ms": ms, "gflop": flops / 1e9, "floor_ms": flops / (peak * 1e9) * 1000,
                "fraction_of_peak": (flops / (peak * 1e9) * 1000) / ms,
            }
        result["matmul_peak_gflops"] = peak
        children = (plan.codes, max(level1, 1), int(np.median(np.diff(catalog.trie.offsets[2]))))
        flops = request_flops(engine.cfg, 128, children)
        result["request"] = {"gflop": flops / 1e9, "floor_ms": flops / (peak * 1e9) * 1000, "children": children}
        result["engine_batching"] = engine_batching_gain(engine, hists, 128, max(plan.concurrency), plan.repeats)
        log.info("request floor %.0f ms (%.1f GFLOP); engine batching gain %.2fx", result["request"]["floor_ms"],
                 flops / 1e9, result["engine_batching"]["gain"])

        if not skip_hf:
            t5, embeds = hf_peer(model, dims)
            hf = hf_latency(t5, embeds(hists[0]), 128, steps, plan.repeats)
            result["hf_ms"] = hf
            log.info("hf beam 128: median %.0f ms", statistics.median(hf))
            del t5
        del engine
        if not skip_triton:
            result["triton"] = triton_throughput(repo, Path(tmp) / "triton", hists, 128, plan.concurrency,
                                                 plan.requests_per_client)

    ours_p50 = statistics.median(result["ours_ms"])
    result["ours_ms_p50"] = ours_p50
    result["trie_overhead"] = ours_p50 / statistics.median(result["ours_unconstrained_ms"]) - 1
    if "hf_ms" in result:
        result["hf_ms_p50"] = statistics.median(result["hf_ms"])
        result["speedup_vs_hf"] = result["hf_ms_p50"] / ours_p50
        # the most any engine doing our arithmetic could reach here: all of it at the measured matmul peak
        result["speedup_ceiling"] = result["hf_ms_p50"] / result["request"]["floor_ms"]
    if "triton" in result:
        qps = {int(c): v["qps"] for c, v in result["triton"].items()}
        result["batching_gain"] = max(qps.values()) / qps[min(qps)]
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "beam_latency.png", sweep, result.get("hf_ms_p50"))
    (out / "beam_vs_hf.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"machine: {result['machine']['cpu']} x{result['machine']['cores']}  dims {result['dims']}",
             f"ours beam 128 p50: {result['ours_ms_p50']:.0f} ms"]
    if "hf_ms_p50" in result:
        lines.append(f"HF T5 generate beam 128 p50: {result['hf_ms_p50']:.0f} ms  ->  "
                     f"speedup {result['speedup_vs_hf']:.1f}x (goal 30x)")
    lines.append(f"request: {result['request']['gflop']:.1f} GFLOP, floor {result['request']['floor_ms']:.0f} ms "
                 f"at the matmul peak = {result['request']['floor_ms'] / result['ours_ms_p50']:.0%} of ours"
                 + (f"; speedup ceiling {result['speedup_ceiling']:.1f}x" if "speedup_ceiling" in result else ""))
    lines.append(f"trie overhead (constrained / unconstrained - 1): {result['trie_overhead']:+.1%} (goal <= 10%)")
    lines.append("beam sweep (ms): " + ", ".join(f"{b}: {v:.0f}" for b, v in result["beam_sweep_ms"].items()))
    for name, d in result["decode_step"].items():
        lines.append(f"decode step {name}: {d['ms']:.1f} ms vs floor {d['floor_ms']:.1f} ms "
                     f"({d['gflop']:.2f} GFLOP at {result['matmul_peak_gflops']:.0f} GFLOP/s) = "
                     f"{d['fraction_of_peak']:.0%} of peak")
    eb = result["engine_batching"]
    lines.append(f"engine alone, {eb['batch']} requests in one search: {eb['gain']:.2f}x the req/s of one")
    if "triton" in result:
        lines.append("triton: " + ", ".join(f"c={c}: {v['qps']:.2f} req/s (batch {v['avg_batch'] or 0:.1f})"
                                             for c, v in result["triton"].items())
                     + f"  -> batching gain {result['batching_gain']:.2f}x (goal 1.5x)")
    return "\n".join(lines)


def main(
    quick: Annotated[bool, typer.Option(help="Reduced run: 100K items, small dims, fewer repeats (<3 min).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result JSON as the last line.")] = False,
    items: Annotated[int | None, typer.Option(help="Catalog size (default 1,000,000; quick 100,000).")] = None,
    codes: Annotated[int, typer.Option(help="K codes per level.")] = 8192,
    dims: Annotated[str | None, typer.Option(help="quick | bench | paper (default bench; quick with --quick).")]
    = None,
    repeats: Annotated[int | None, typer.Option(help="Timed repeats per measurement (default 5; quick 2).")] = None,
    precision: Annotated[str, typer.Option(help="fp32 (CPU) or fp16 (GPU).")] = "fp32",
    skip_hf: Annotated[bool, typer.Option(help="Leave out the HF peer.")] = False,
    skip_triton: Annotated[bool, typer.Option(help="Leave out the Triton throughput part.")] = False,
    out: Annotated[Path, typer.Option(help="Where the JSON and the PNG go.")] = Path("runs/bench"),
    seed: int = 0,
) -> None:
    """Run the benchmark; see the module docstring."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    dims = dims or ("quick" if quick else "bench")
    if dims not in DIMS:
        raise typer.BadParameter(f"unknown dims {dims!r}; use {', '.join(DIMS)}", param_hint="--dims")
    plan = Plan(
        items=items or (100_000 if quick else 1_000_000), codes=codes, dims=dims,
        repeats=repeats or (2 if quick else 5),
        beams=(16, 64, 128) if quick else (16, 32, 64, 128, 256),
        concurrency=(1, 4) if quick else (1, 4, 8), requests_per_client=2 if quick else 3,
    )
    result = run(plan, out, seed, skip_hf, skip_triton, precision)
    typer.echo(report(result), err=True)
    if as_json:
        typer.echo(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
