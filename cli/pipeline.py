"""`onerec prepare | tokenize | train | evaluate | train-reward | align`: each parses options, runs one stage."""

from __future__ import annotations

import json
import subprocess
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cli.common import JsonOption, LimitOption, ReuseOption, RunOption, Split, SplitOption, progress, user_errors
from onerec import stages
from onerec.data.sources import SourceOptions, source_names
from onerec.errors import UsageError
from onerec.runs import RunDir

app = typer.Typer()
SourceName = Enum("SourceName", {name: name for name in source_names()}, type=str)  # `--source`: the registry's


# --- prepare ----------------------------------------------------------------------------------------------


@app.command()
@user_errors
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Run directory to create.")],
    source: Annotated[SourceName, typer.Option(help="Where interactions come from.")] = SourceName(source_names()[0]),
    path: Annotated[Path | None, typer.Option(
        help="MovieLens directory or ratings file; sequences: the `user item item ...` file.")] = None,
    preset: Annotated[str | None, typer.Option(help="Preset for the run (tiny, small, small-seq, paper); recorded "
        "in prepare.json, the later stages' default (default: the source's: small; small-seq for sequences).")
    ] = None,
    users: Annotated[int, typer.Option(help="Synthetic: number of users.")] = 2000,
    items: Annotated[int, typer.Option(help="Synthetic: number of items.")] = 5000,
    seed: Annotated[int, typer.Option(help="Synthetic: random seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run directory.")] = False,
    reuse: ReuseOption = False,
) -> None:
    """Read interactions, build sessions (history <= 256 positives, target = next 5) and the time split."""
    options = SourceOptions(path=path, users=users, items=items, seed=seed)
    stages.prepare(RunDir(out), source.value, options, preset=preset, force=force, reuse=reuse)


# --- tokenize ---------------------------------------------------------------------------------------------


@app.command()
@user_errors
def tokenize(
    run_dir: RunOption,
    preset: Annotated[str | None, typer.Option(
        help="Preset whose tokenizer settings are the defaults (default: the one prepare recorded).")] = None,
    codes: Annotated[int | None, typer.Option(help="K codes per level (default: the preset's).")] = None,
    levels: Annotated[int | None, typer.Option(help="L levels (default: the preset's).")] = None,
    iters: Annotated[int | None, typer.Option(help="k-means iterations per level.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="External item embeddings (.npy, N x d).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    unique: Annotated[bool | None, typer.Option(
        "--unique/--no-unique", help="Collision-free last SID level, so every item is reachable (default: the "
        "preset's).")] = None,
    window: Annotated[int | None, typer.Option(
        help="Co-occurrence window of the PPMI-SVD embeddings: 0 = anywhere in a user's positives; W > 0 = items "
             "at most W apart in the user's time order, weight 1/distance (default: the preset's).")] = None,
    attribute_weight: Annotated[float | None, typer.Option(
        help="Weight of the item attributes (e.g. Amazon brand/category) as pseudo-users in the embeddings; 0 = "
             "interactions only (default: the preset's).")] = None,
    reuse: ReuseOption = False,
) -> None:
    """Embed items (PPMI-SVD by default), balanced residual k-means -> SIDs, and write the catalog."""
    stages.tokenize(RunDir(run_dir), preset, codes=codes, levels=levels, iters=iters, device=device, unique=unique,
                    embeddings=embeddings, reuse=reuse, window=window, attribute_weight=attribute_weight)


# --- train ------------------------------------------------------------------------------------------------


@app.command()
@user_errors
def train(
    run_dir: RunOption,
    preset: Annotated[str | None, typer.Option(
        help="Model and training preset: tiny, small, small-seq or paper (default: the one prepare recorded).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Override the preset's learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the preset's batch size.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the preset's seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from checkpoints/last.")] = False,
    reuse: ReuseOption = False,
    nproc: Annotated[int, typer.Option(help="Train data-parallel in N processes on this machine: launches torchrun "
        "(DDP, gloo on the CPU, nccl on GPUs); --batch-size stays the global batch.")] = 1,
) -> None:
    """Next-token training on the train sessions; keeps the epoch best by the preset's validation measure
    (validation loss, or NDCG@10 / Recall@10 of generated answers) in RUN/model. Also runs
    under `torchrun --nproc-per-node N -m cli train ...` (rank 0 writes the checkpoints, the model and train.json)."""
    if nproc < 1:
        raise UsageError(f"--nproc: must be at least 1, got {nproc}")
    if nproc > 1:
        options = {"--preset": preset, "--epochs": epochs, "--lr": lr, "--batch-size": batch_size, "--seed": seed,
                   "--device": device}
        raise typer.Exit(code=_torchrun(nproc, RunDir(run_dir), options, resume=resume, reuse=reuse))
    stages.train(RunDir(run_dir), preset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                 resume=resume, reuse=reuse, progress=progress())


def _torchrun(nproc: int, run: RunDir, options: dict[str, object], resume: bool, reuse: bool) -> int:
    """`onerec train` with these options in `nproc` torchrun processes; its exit code. Bad options fail here first,
    with one line, not once per rank."""
    from onerec.train.distributed import launched_world_size, torchrun_command

    if launched_world_size() > 1:
        raise UsageError("--nproc: already running under torchrun; drop --nproc")
    if not (reuse and run.is_complete("train")):
        stages.train_preset(run, **{name.lstrip("-").replace("-", "_"): value for name, value in options.items()})
    args = ["train", "--run", str(run.root)]
    args += [part for name, value in options.items() if value is not None for part in (name, str(value))]
    args += ["--resume"] * resume + ["--reuse"] * reuse
    code = subprocess.call(torchrun_command(nproc, "cli", args))
    if code != 0:
        typer.echo(f"error: torchrun --nproc-per-node {nproc} exited with code {code}", err=True)
    return code


# --- evaluate ---------------------------------------------------------------------------------------------


@app.command()
@user_errors
def evaluate(
    run_dir: RunOption,
    as_json: JsonOption = False,
    split: SplitOption = Split.test,
    checkpoint: Annotated[Path | None, typer.Option(help="Model directory (default RUN/model).")] = None,
    beam_width: Annotated[int | None, typer.Option(help="Beam width (default: the trained preset's).")] = None,
    limit: LimitOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    no_reward: Annotated[bool, typer.Option("--no-reward", help="Skip the reward model's scores.")] = False,
    new_item_share: Annotated[float, typer.Option(
        help="Map answers as the gateway does with ONEREC_NEW_ITEM_SHARE: up to this share of the slots go to new "
             "items (no training positive) sharing a generated item's first L-1 codes.")] = 0.0,
) -> None:
    """Recall / NDCG at 5 and 10 of generated sessions vs the held-out targets, beside a most-popular baseline; with a
    reward model (`onerec train-reward`), also its mean and max swt/vtr/wtr/ltr over the generated sessions."""
    scored = stages.evaluate(RunDir(run_dir), split.value, checkpoint=checkpoint, beam_width=beam_width, limit=limit,
                             device=device, reward=not no_reward, progress=progress(),
                             new_item_share=new_item_share)
    result = scored.result
    if as_json:
        typer.echo(json.dumps(result.as_json()))
        return
    typer.echo(f"{scored.split} users: {result.users}   beam width: {scored.beam_width}   ({result.seconds:.0f}s)")
    table = result.as_json()
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    typer.echo(f"{'':10}" + "".join(f"{key:>11}" for key in keys) + f"   ({result.protocol} protocol)")
    for side in ("model", "popular"):
        typer.echo(f"{side:10}" + "".join(f"{table[side][key]:>11.4f}" for key in keys))
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
    done = stages.train_reward(RunDir(run_dir), preset, epochs=epochs, seed=seed, device=device, reuse=reuse,
                               progress=progress())
    if not done.reused:
        typer.echo(json.dumps(stages.reward_summary(done.marker)))


# --- align ------------------------------------------------------------------------------------------------


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

    cfg = AlignConfig(iterations=iterations, dpo_ratio=dpo_ratio, responses=responses, loss=loss, beta=beta,
                      lam=lam, label_smoothing=label_smoothing, target=target, lr=lr, batch_size=batch_size,
                      seed=seed)
    stages.align(RunDir(run_dir), cfg, device=device, out=out, progress=progress(),
                 on_iteration=lambda record: typer.echo(json.dumps(record)))
