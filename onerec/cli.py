"""The `onerec` command line: prepare -> tokenize -> train -> evaluate, each writing into one run directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from onerec.config import DataConfig, TokenizerConfig, from_dict, get_preset, save_json, to_dict
from onerec.device import resolve_device
from onerec.errors import UsageError
from onerec.runs import RunDir, staging_dir

app = typer.Typer(
    help="OneRec-style generative recommendation: build a run directory stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("onerec")

RunOption = Annotated[Path, typer.Option("--run", help="Run directory written by `onerec prepare`.")]
ReuseOption = Annotated[bool, typer.Option("--reuse", help="Do nothing if this stage already completed.")]


class Source(str, Enum):
    movielens = "movielens"
    synthetic = "synthetic"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UsageError (bad file, option or run directory) into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """Logs go to stderr; machine-readable output (--json) goes to stdout."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _progress() -> bool:
    return sys.stderr.isatty()


# --- prepare ----------------------------------------------------------------------------------------------


@app.command()
@user_errors
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Run directory to create.")],
    source: Annotated[Source, typer.Option(help="Where interactions come from.")] = Source.movielens,
    path: Annotated[Path | None, typer.Option(help="MovieLens directory or ratings file.")] = None,
    preset: Annotated[str, typer.Option(help="Preset whose data settings to use (tiny, small, paper).")] = "small",
    users: Annotated[int, typer.Option(help="Synthetic: number of users.")] = 2000,
    items: Annotated[int, typer.Option(help="Synthetic: number of items.")] = 5000,
    seed: Annotated[int, typer.Option(help="Synthetic: random seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run directory.")] = False,
    reuse: ReuseOption = False,
) -> None:
    """Read interactions, build sessions (history <= 256 positives, target = next 5) and the time split."""
    from onerec.data.movielens import load_movielens
    from onerec.data.sessions import build_sessions
    from onerec.data.synthetic import SyntheticConfig, generate

    run = RunDir(out)
    if run.is_complete("prepare") and reuse:
        log.info("prepare: reusing %s", out)
        return
    if out.exists() and not force:
        raise UsageError(f"--out: {out} already exists; pass --force to replace it or --reuse to keep it")
    data_cfg = get_preset(preset).data
    if source is Source.movielens:
        if path is None:
            raise UsageError("--path: required with --source movielens")
        interactions = load_movielens(path)
        origin: dict[str, Any] = {"source": "movielens", "path": str(path.resolve())}
    else:
        synth = SyntheticConfig(users=users, items=items, seed=seed)
        interactions = generate(synth).interactions
        origin = {"source": "synthetic", "synthetic": dataclasses.asdict(synth)}
    split = build_sessions(interactions, data_cfg)
    if len(split.test) == 0:
        raise UsageError(f"--path: {path} yields no test sessions (too few positive interactions per user)")
    with staging_dir(out) as tmp:
        staged = RunDir(tmp)
        staged.data.mkdir()
        interactions.save(staged.interactions)
        split.train_interactions.save(staged.train_interactions)
        for name in ("train", "val", "test"):
            getattr(split, name).save(staged.sessions(name))
        stats = {
            "interactions": len(interactions),
            "users": int(np.unique(interactions.users).size),
            "items": int(np.unique(interactions.items).size),
            "sessions": {name: len(getattr(split, name)) for name in ("train", "val", "test")},
        }
        staged.complete("prepare", {**origin, "data": to_dict(data_cfg), "stats": stats})
    log.info("prepare: %s -> %s %s", origin["source"], out, json.dumps(stats["sessions"]))


# --- tokenize ---------------------------------------------------------------------------------------------


@app.command()
@user_errors
def tokenize(
    run_dir: RunOption,
    preset: Annotated[str, typer.Option(help="Preset whose tokenizer settings are the defaults.")] = "small",
    codes: Annotated[int | None, typer.Option(help="K codes per level (default: the preset's).")] = None,
    levels: Annotated[int | None, typer.Option(help="L levels (default: the preset's).")] = None,
    iters: Annotated[int | None, typer.Option(help="k-means iterations per level.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="External item embeddings (.npy, N x d).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    reuse: ReuseOption = False,
) -> None:
    """Embed items (PPMI-SVD by default), balanced residual k-means -> SIDs, and write the catalog."""
    from onerec.data.embeddings import load_embeddings, ppmi_svd_embeddings
    from onerec.data.interactions import Interactions
    from onerec.tokenizer.catalog import Catalog
    from onerec.tokenizer.residual import residual_quantize

    run = RunDir(run_dir)
    run.require("prepare")
    if run.is_complete("tokenize") and reuse:
        log.info("tokenize: reusing %s", run.catalog)
        return
    base = get_preset(preset).tokenizer
    overrides = {"codes": codes, "levels": levels, "iters": iters, "device": device}
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    _check_tokenizer(cfg)
    all_interactions = Interactions.load(run.interactions)
    train_interactions = Interactions.load(run.train_interactions)
    video_ids = np.unique(all_interactions.items)  # (N,) every item seen, ascending
    if len(video_ids) == 0:
        raise UsageError(f"{run.interactions}: empty catalog (no items)")
    if cfg.codes > len(video_ids):
        raise UsageError(f"--codes: K={cfg.codes} is larger than the item count N={len(video_ids)}")
    if embeddings is not None:
        vectors = load_embeddings(embeddings, len(video_ids))
    else:
        vectors = ppmi_svd_embeddings(train_interactions, video_ids, cfg.embedding_dim, seed=cfg.seed)
    run.invalidate_from("tokenize")  # inputs are valid: from here the old catalog is being replaced
    np.save(run.embeddings, vectors)
    result = residual_quantize(vectors, cfg)
    popularity = _counts(train_interactions.items, video_ids)
    catalog = Catalog.build(video_ids, result.sids, popularity, cfg.codes)
    catalog.save(run.catalog)
    run.complete("tokenize", {"tokenizer": to_dict(cfg), "report": result.report,
                              "embeddings": str(embeddings) if embeddings else "ppmi-svd",
                              "content_hash": catalog.content_hash})
    log.info("tokenize: %d items -> %d SIDs (collision rate %.4f), catalog %s", len(video_ids),
             catalog.num_leaves, result.report["collision_rate"], catalog.content_hash[:12])


def _check_tokenizer(cfg: TokenizerConfig) -> None:
    if cfg.codes < 2:
        raise UsageError(f"--codes: must be >= 2, got {cfg.codes}")
    if cfg.levels < 1:
        raise UsageError(f"--levels: must be >= 1, got {cfg.levels}")
    if cfg.iters < 1:
        raise UsageError(f"--iters: must be >= 1, got {cfg.iters}")


def _counts(items: np.ndarray, video_ids: np.ndarray) -> np.ndarray:
    """Occurrences of each of `video_ids` (ascending) in `items`."""
    counts = np.zeros(len(video_ids), dtype=np.int64)
    rows = np.searchsorted(video_ids, items)
    ok = (rows < len(video_ids)) & (video_ids[np.minimum(rows, len(video_ids) - 1)] == items)
    np.add.at(counts, rows[ok], 1)
    return counts


# --- train ------------------------------------------------------------------------------------------------


@app.command()
@user_errors
def train(
    run_dir: RunOption,
    preset: Annotated[str, typer.Option(help="Model and training preset: tiny, small or paper.")] = "small",
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Override the preset's learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the preset's batch size.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the preset's seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from checkpoints/last.")] = False,
    reuse: ReuseOption = False,
) -> None:
    """Next-token training on the train sessions; keeps the best model by validation loss in RUN/model."""
    from onerec.data.sessions import Sessions
    from onerec.tokenizer.catalog import Catalog
    from onerec.train.ntp import SidSessions
    from onerec.train.ntp import train as train_model

    run = RunDir(run_dir)
    run.require("tokenize")
    if run.is_complete("train") and reuse:
        log.info("train: reusing %s", run.model)
        return
    chosen = get_preset(preset)
    overrides = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "device": device}
    train_cfg = dataclasses.replace(chosen.train, **{k: v for k, v in overrides.items() if v is not None})
    if train_cfg.epochs < 1 or train_cfg.batch_size < 1 or train_cfg.lr <= 0:
        raise UsageError("--epochs/--batch-size/--lr: must be positive")
    data_cfg = from_dict(DataConfig, run.read_marker("prepare")["data"])
    chosen = dataclasses.replace(chosen, train=train_cfg, data=data_cfg)
    catalog = Catalog.load(run.catalog)
    history_len = chosen.model.history_len
    train_data = SidSessions.from_sessions(Sessions.load(run.sessions("train")), catalog, history_len)
    val_data = SidSessions.from_sessions(Sessions.load(run.sessions("val")), catalog, history_len)
    run.invalidate_from("train")
    if not resume:
        shutil.rmtree(run.checkpoint, ignore_errors=True)
    result = train_model(chosen, catalog, train_data, val_data, run.checkpoint, run.model, resume=resume,
                         progress=_progress())
    run.complete("train", {"preset": chosen.name, "train": to_dict(train_cfg), "best_epoch": result.best_epoch,
                           "best_val_loss": result.best_val_loss, "history": result.history,
                           "seconds": round(result.seconds, 1), "catalog_hash": catalog.content_hash})
    log.info("train: best epoch %d val_loss %.4f in %.0fs -> %s", result.best_epoch, result.best_val_loss,
             result.seconds, run.model)


# --- evaluate ---------------------------------------------------------------------------------------------


class Split(str, Enum):
    test = "test"
    val = "val"


@app.command()
@user_errors
def evaluate(
    run_dir: RunOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    split: Annotated[Split, typer.Option(help="Held-out split to score.")] = Split.test,
    checkpoint: Annotated[Path | None, typer.Option(help="Model directory (default RUN/model).")] = None,
    beam_width: Annotated[int | None, typer.Option(help="Beam width (default: the trained preset's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N users.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    no_reward: Annotated[bool, typer.Option("--no-reward", help="Skip the reward model's scores.")] = False,
) -> None:
    """Recall@5 / NDCG@5 of generated sessions vs the held-out targets, beside a most-popular baseline; with a
    reward model (`onerec train-reward`), also its mean and max swt/vtr/wtr/ltr over the generated sessions."""
    from onerec.data.sessions import Sessions
    from onerec.eval import evaluate as run_eval
    from onerec.model.onerec import load_model
    from onerec.tokenizer.catalog import Catalog

    run = RunDir(run_dir)
    run.require("train")
    trained = run.read_marker("train")
    beam = get_preset(trained["preset"]).beam
    if beam_width is not None:
        if not 1 <= beam_width <= 1024:
            raise UsageError(f"--beam-width: must be in [1, 1024], got {beam_width}")
        beam = dataclasses.replace(beam, beam_width=beam_width)
    catalog = Catalog.load(run.catalog)
    if trained.get("catalog_hash") != catalog.content_hash:
        raise UsageError(f"{run.catalog}: catalog hash differs from the one the model was trained on")
    dev = resolve_device(device)
    model = load_model(checkpoint or run.model, device=str(dev))
    scorer = None
    if not no_reward and run.is_complete("reward"):  # `onerec train-reward` ran: score every generated session
        from onerec.reward.train import load_reward, session_scorer

        scorer = session_scorer(load_reward(run.root, device=dev))
    result = run_eval(model, catalog, Sessions.load(run.sessions(split.value)), beam, limit=limit, device=dev,
                      progress=_progress(), scorer=scorer)
    payload = result.as_json()
    save_json(run.eval, {**payload, "split": split.value, "beam_width": beam.beam_width,
                         "checkpoint": str(checkpoint or run.model), "seconds": round(result.seconds, 1)})
    if as_json:
        typer.echo(json.dumps(payload))
        return
    typer.echo(f"{split.value} users: {result.users}   beam width: {beam.beam_width}   ({result.seconds:.0f}s)")
    typer.echo(f"{'':10}{'recall@5':>10}{'ndcg@5':>10}")
    typer.echo(f"{'model':10}{result.model_recall:>10.4f}{result.model_ndcg:>10.4f}")
    typer.echo(f"{'popular':10}{result.popular_recall:>10.4f}{result.popular_ndcg:>10.4f}")
    typer.echo(f"valid SID rate: {result.valid_sid_rate:.4f}")
    if result.reward is not None:
        typer.echo("reward over generated sessions (mean / max per user, averaged): " + "  ".join(
            f"{t} {v['mean']:.4f}/{v['max']:.4f}" for t, v in result.reward.items()))


# --- train-reward -----------------------------------------------------------------------------------------


@app.command("train-reward")
@user_errors
def train_reward(
    run_dir: RunOption,
    preset: Annotated[str, typer.Option(help="Reward model preset: tiny or small.")] = "small",
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the preset's seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    reuse: ReuseOption = False,
) -> None:
    """Train the reward model (swt, vtr, wtr, ltr towers) on logged sessions; prints a JSON summary."""
    from onerec.reward.model import get_reward_config
    from onerec.reward.train import STAGE, train_reward_stage

    run = RunDir(run_dir)
    run.require("tokenize")
    if run.is_complete(STAGE) and reuse:
        log.info("train-reward: reusing %s", run.marker(STAGE))
        return
    overrides = {"epochs": epochs, "seed": seed, "device": device}
    cfg = dataclasses.replace(get_reward_config(preset), **{k: v for k, v in overrides.items() if v is not None})
    if device is not None:
        resolve_device(device)  # a bad --device fails before any work
    summary = train_reward_stage(run, cfg, preset, progress=_progress())
    typer.echo(json.dumps(summary))


@app.command()
@user_errors
def align(
    run_dir: RunOption,
    iterations: Annotated[int, typer.Option(help="IPA iterations T; model t starts from model t-1.")] = 1,
    dpo_ratio: Annotated[float, typer.Option(help="r_DPO: share of training sessions given self-generated pairs.")
                         ] = 0.01,
    responses: Annotated[int, typer.Option(help="N sessions beam-searched per sampled user.")] = 128,
    loss: Annotated[str, typer.Option(help="Preference loss: dpo, ipo, cdpo or simpo.")] = "dpo",
    beta: Annotated[float, typer.Option(help="β of the preference loss.")] = 0.1,
    lam: Annotated[float, typer.Option("--lambda", help="λ: weight of the preference loss beside NTP.")] = 1.0,
    label_smoothing: Annotated[float, typer.Option(help="cDPO's ε.")] = 0.0,
    target: Annotated[str, typer.Option(help="Reward tower that picks chosen/rejected: swt, vtr, wtr or ltr.")
                      ] = "swt",
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-5,
    batch_size: Annotated[int, typer.Option(help="NTP sessions per step.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (user sampling, batches, dropout).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Where iterations go (default RUN/align).")] = None,
) -> None:
    """Iterative Preference Alignment (paper Algorithm 2) from RUN/model with the run's reward model; iteration t
    is saved to RUN/align/iter_t/ (evaluate or export it with --checkpoint). Prints one JSON line per iteration."""
    from onerec.align.ipa import AlignConfig
    from onerec.align.ipa import align as run_align
    from onerec.data.sessions import Sessions
    from onerec.model.onerec import load_model
    from onerec.reward.train import load_reward, session_scorer
    from onerec.tokenizer.catalog import Catalog
    from onerec.train.ntp import SidSessions

    run = RunDir(run_dir)
    run.require("train")
    cfg = AlignConfig(iterations=iterations, dpo_ratio=dpo_ratio, responses=responses, loss=loss, beta=beta,
                      lam=lam, label_smoothing=label_smoothing, target=target, lr=lr, batch_size=batch_size,
                      seed=seed)
    cfg.check()
    dev = resolve_device(device)
    catalog = Catalog.load(run.catalog)
    model = load_model(run.model, device=str(dev))
    scorer = session_scorer(load_reward(run.root, device=dev))
    train_data = SidSessions.from_sessions(Sessions.load(run.sessions("train")), catalog, model.cfg.history_len)
    out = out or run.root / "align"
    history: list[dict] = []

    def record(result, directory: Path) -> None:
        history.append({**result.as_json(), "checkpoint": str(directory)})
        save_json(out / "align.json", {"config": dataclasses.asdict(cfg), "iterations": history})
        typer.echo(json.dumps(history[-1]))

    run_align(model, catalog, train_data, scorer, cfg, out, dev, progress=_progress(), on_iteration=record)


class Precision(str, Enum):
    auto = "auto"
    fp16 = "fp16"
    fp32 = "fp32"


@app.command("export")
@user_errors
def export_cmd(
    run_dir: RunOption,
    out: Annotated[Path, typer.Option("--out", help="Triton model repository to add a version to.")] = Path(
        "model_repo"),
    precision: Annotated[Precision, typer.Option(
        help="Decoder/encoder weights and KV cache: fp16 (GPU), fp32 (CPU) or auto (fp16 when CUDA is here).")
    ] = Precision.auto,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check the export against torch on test users and print the parity report as JSON.")
    ] = False,
    users: Annotated[int, typer.Option(help="Test users --verify compares on.")] = 32,
    device: Annotated[str, typer.Option(help="Where Triton runs the backend: auto, cpu or cuda.")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Requests Triton's dynamic batcher hands over at once.")] = 16,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Model directory to export (default RUN/model; e.g. RUN/align/iter_2 for an IPA iteration).")] = None,
) -> None:
    """Write the run's model and catalog as a new version of the Triton model `onerec`."""
    from export.repository import ServingConfig, export_run

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: unknown device {device!r}; use auto, cpu or cuda")
    if max_batch_size < 1:
        raise UsageError(f"--max-batch-size: must be >= 1, got {max_batch_size}")
    serving = ServingConfig(device=device, max_batch_size=max_batch_size)
    if checkpoint is not None and not (checkpoint / "model.safetensors").is_file():
        raise UsageError(f"--checkpoint: {checkpoint} is not a model directory (no model.safetensors)")
    version = export_run(run_dir, out, precision.value, serving, checkpoint)
    typer.echo(f"exported {version}", err=True)
    if verify:
        from export.verify import verify as run_verify
        from onerec.data.sessions import Sessions
        from onerec.model.onerec import load_model

        run = RunDir(run_dir)
        beam = get_preset(run.read_marker("train")["preset"]).beam
        report = run_verify(load_model(checkpoint or run.model), version, Sessions.load(run.sessions("test")), users,
                            beam)
        typer.echo(json.dumps({"version": str(version), **report.as_json()}))


@app.command()
@user_errors
def triton(
    model_repo: Annotated[Path, typer.Option("--model-repo", help="Triton model repository.")] = Path("model_repo"),
    http_port: Annotated[int, typer.Option(help="HTTP port (health, metadata, inference).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (what the gateway calls).")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    workdir: Annotated[Path, typer.Option(help="Backend links and the server log go here.")] = Path(
        "runs/triton"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 300.0,
) -> None:
    """Run the real tritonserver (from the nvidia-pytriton wheel) on MODEL_REPO until interrupted."""
    import signal
    import time

    from onerec.serving.triton import TritonPorts, TritonServer

    server = TritonServer(model_repo, workdir, TritonPorts(http_port, grpc_port, metrics_port), host)
    try:
        server.start(timeout)
    except RuntimeError as e:
        raise UsageError(str(e).splitlines()[0] + f" (log: {server.log_path})") from e
    typer.echo(f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  log {server.log_path}")
    (server.workdir / "tritonserver.pid").write_text(f"{server.process.pid}\n")  # `onerec down`'s last resort
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        while not stop["now"] and server.alive():
            time.sleep(0.5)
    finally:
        code = server.stop()
    if not stop["now"]:
        raise UsageError(f"tritonserver exited on its own with {code} (log: {server.log_path})")


class HistorySplit(str, Enum):
    latest = "latest"
    test = "test"


@app.command("load-histories")
@user_errors
def load_histories(
    run_dir: RunOption,
    redis_url: Annotated[str, typer.Option(envvar="ONEREC_REDIS_URL", help="Redis to write to.")] = (
        "redis://127.0.0.1:6379/0"),
    prefix: Annotated[str, typer.Option(envvar="ONEREC_HISTORY_PREFIX", help="History key prefix.")] = (
        "onerec:history:"),
    cap: Annotated[int, typer.Option(envvar="ONEREC_HISTORY_LEN", help="Videos kept per user.")] = 256,
    which: Annotated[HistorySplit, typer.Option(
        "--histories", help="latest: every positive up to now (what production holds); test: the test sessions' "
                            "histories, so /recommend can be scored against the held-out targets.")
    ] = HistorySplit.latest,
    batch: Annotated[int, typer.Option(help="Users per pipelined MULTI/EXEC.")] = 500,
    users_out: Annotated[Path | None, typer.Option(
        help="Also write the loaded user ids here, one per line (what the load tests draw from).")] = None,
    videos_out: Annotated[Path | None, typer.Option(
        help="Also write the run catalog's video ids here, most popular first (what the load tests post).")] = None,
) -> None:
    """Replace the users' Redis histories with the run's (most recent first); prints a JSON summary."""
    import time

    import redis
    from tqdm import tqdm

    from onerec.data.interactions import Interactions
    from onerec.data.sessions import Sessions, latest_histories
    from service.history import bulk_load

    if cap < 1 or batch < 1:
        raise UsageError(f"--cap and --batch must be >= 1, got {cap} and {batch}")
    run = RunDir(run_dir)
    run.require("prepare")
    if which is HistorySplit.latest:
        positive = float(run.read_marker("prepare")["data"]["positive_rating"])
        histories = [(str(u), h.tolist()) for u, h in latest_histories(Interactions.load(run.interactions),
                                                                          positive, cap)]
    else:
        test = Sessions.load(run.sessions("test"))
        histories = [(str(int(test.users[i])), test.history_of(i).tolist()) for i in range(len(test))]
    start = time.perf_counter()
    client = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5)
    try:
        with tqdm(total=len(histories), unit="user", disable=not _progress(), desc="load-histories") as bar:
            users, videos = bulk_load(client, histories, prefix, cap, batch, bar.update)
    except redis.RedisError as e:
        raise UsageError(f"--redis-url {redis_url}: {e}") from e
    finally:
        client.close()
    seconds = time.perf_counter() - start
    if users_out is not None:
        users_out.parent.mkdir(parents=True, exist_ok=True)
        users_out.write_text("".join(f"{user}\n" for user, _ in histories))
    if videos_out is not None:
        from onerec.tokenizer.catalog import Catalog

        catalog = Catalog.load(run.catalog)
        videos_out.parent.mkdir(parents=True, exist_ok=True)
        videos_out.write_text("".join(f"{int(v)}\n" for v in catalog.video_ids[catalog.popular_order]))
    log.info("loaded %d histories (%d videos) into %s in %.1fs", users, videos, redis_url, seconds)
    typer.echo(json.dumps({"users": users, "videos": videos, "histories": which.value, "seconds": round(seconds, 2)}))


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the gateway (FastAPI under uvicorn). Settings come from ONEREC_* variables (see service/settings.py)."""
    import os
    import tempfile

    import uvicorn

    from service.settings import Settings

    if workers < 1:
        raise UsageError(f"--workers: must be >= 1, got {workers}")
    try:
        settings = Settings()
    except ValueError as e:
        raise UsageError(f"ONEREC_* settings: {e}") from e
    made_metrics_dir = workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if made_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="onerec-metrics-")
    log.info("gateway on http://%s:%d (%d worker(s)); triton %s, redis %s", host, port, workers,
             settings.triton_url, settings.redis_url)
    try:
        uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        if made_metrics_dir:  # the workers' metric files die with them
            import shutil

            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


# --- the local stack -----------------------------------------------------------------------------------------

StateOption = Annotated[Path | None, typer.Option(help="Where the stack keeps pids, logs, data (default RUN/stack).")]


@app.command()
@user_errors
def up(
    run_dir: RunOption,
    model_repo: Annotated[Path | None, typer.Option(
        help="Triton model repository (default RUN/model_repo); the run is exported into it when needed.")] = None,
    state_dir: StateOption = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Model directory to serve (default RUN/model; e.g. RUN/align/iter_1, an IPA iteration).")] = None,
    host: Annotated[str, typer.Option(help="Address every server listens on.")] = "127.0.0.1",
    gateway_port: Annotated[int, typer.Option(help="Gateway HTTP port.")] = 8080,
    redis_port: Annotated[int, typer.Option(help="Redis port.")] = 6379,
    triton_http_port: Annotated[int, typer.Option(help="Triton HTTP port.")] = 8000,
    triton_grpc_port: Annotated[int, typer.Option(help="Triton gRPC port.")] = 8001,
    triton_metrics_port: Annotated[int, typer.Option(help="Triton metrics port.")] = 8002,
    workers: Annotated[int, typer.Option(help="Gateway worker processes.")] = 1,
    beam_width: Annotated[int, typer.Option(help="Beam width the gateway asks for.")] = 128,
    precision: Annotated[Precision, typer.Option(help="Export precision when the run must be exported.")] = (
        Precision.auto),
    timeout: Annotated[float, typer.Option(help="Seconds each server may take to become ready.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stack state as JSON.")] = False,
) -> None:
    """Start Redis, tritonserver and the gateway for a trained run (exporting it if needed), load the users'
    histories, and return once the gateway's /readyz is ready. The processes keep running: `onerec down` stops them."""
    from onerec.serving.triton import TritonPorts
    from service.stack import Stack, StackConfig

    if workers < 1 or beam_width < 1:
        raise UsageError(f"--workers and --beam-width must be >= 1, got {workers} and {beam_width}")
    if checkpoint is not None and not (checkpoint / "model.safetensors").is_file():
        raise UsageError(f"--checkpoint: {checkpoint} is not a model directory (no model.safetensors)")
    cfg = StackConfig(run=run_dir, model_repo=model_repo, state_dir=state_dir, checkpoint=checkpoint, host=host,
                      gateway_port=gateway_port,
                      redis_port=redis_port, triton_ports=TritonPorts(triton_http_port, triton_grpc_port,
                                                                      triton_metrics_port),
                      workers=workers, beam_width=beam_width, precision=precision.value, timeout_s=timeout)
    state = Stack(cfg).up()
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps(asdict(state)))
        return
    typer.echo(f"gateway   {state.gateway_url}   (model version {state.model_version}, repo {state.model_repo})")
    typer.echo(f"triton    {state.triton_http_url}   metrics {state.triton_metrics_url}")
    typer.echo(f"redis     {state.redis_url}")
    typer.echo(f"logs      {Path(state.logs['gateway']).parent}")
    typer.echo(f"stop it with: onerec down --run {run_dir}")


@app.command()
@user_errors
def down(run_dir: RunOption, state_dir: StateOption = None) -> None:
    """Stop the stack `onerec up` started for RUN (gateway, then Triton, then Redis); prints what it stopped."""
    from service.stack import Stack, StackConfig

    stopped = Stack(StackConfig(run=run_dir, state_dir=state_dir)).down()
    typer.echo(json.dumps(stopped) if stopped else "nothing running")


@app.command()
@user_errors
def status(run_dir: RunOption, state_dir: StateOption = None) -> None:
    """The stack of RUN as JSON: URLs, pids, which processes are alive, and the gateway's /readyz."""
    from service.stack import Stack, StackConfig

    typer.echo(json.dumps(Stack(StackConfig(run=run_dir, state_dir=state_dir)).status()))


@app.command()
@user_errors
def recommend(
    run_dir: RunOption,
    user: Annotated[list[str] | None, typer.Option(help="User id (repeatable; default: a few loaded users).")] = None,
    count: Annotated[int, typer.Option(help="Users to ask for when no --user is given.")] = 3,
    state_dir: StateOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per answer.")] = False,
) -> None:
    """Ask the running stack for recommendations and print them with titles (MovieLens u.item when the run has it)."""
    from service.stack import Stack, StackConfig, ask_gateway, describe

    stack = Stack(StackConfig(run=run_dir, state_dir=state_dir))
    answers = ask_gateway(stack.running(), user or [], count)
    titles = {} if as_json else stack.titles()
    for answer in answers:
        typer.echo(json.dumps(answer) if as_json else describe(answer, titles))


if __name__ == "__main__":
    app()
