"""`onerec baselines`: most popular, item-kNN, EASE and SASRec+ on a run's split, scored like `onerec evaluate`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import JsonOption, LimitOption, RunOption, Split, SplitOption, progress, user_errors
from onerec import stages
from onerec.runs import RunDir

app = typer.Typer()


@app.command()
@user_errors
def baselines(
    run_dir: RunOption,
    as_json: JsonOption = False,
    split: SplitOption = Split.test,
    only: Annotated[str | None, typer.Option(help="Comma-separated subset of popular,itemknn,ease,sasrec.")] = None,
    limit: LimitOption = None,
    sasrec_epochs: Annotated[int | None, typer.Option(help="SASRec: at most this many epochs (early stopping).")
                             ] = None,
    sasrec_seed: Annotated[int | None, typer.Option(help="SASRec: this seed instead of 0 (initialisation, batches, "
                                                 "dropout), to measure its run-to-run spread.")] = None,
    device: Annotated[str, typer.Option(help="SASRec's device: auto, cpu or cuda.")] = "auto",
) -> None:
    """Train the classic baselines on the run's training positives and score them on the held-out split with the
    same users, history exclusion, full-catalogue ranking and metric code as `onerec evaluate`."""
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    results = stages.baselines(RunDir(run_dir), split.value, only=names, limit=limit, device=device,
                               sasrec_epochs=sasrec_epochs, sasrec_seed=sasrec_seed, progress=progress())
    if as_json:
        typer.echo(json.dumps(results))
        return
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    typer.echo(f"{'':10}" + "".join(f"{k:>11}" for k in keys) + f"{'seconds':>9}")
    for name, metrics in results.items():
        typer.echo(f"{name:10}" + "".join(f"{metrics[k]:>11.4f}" for k in keys) + f"{metrics['seconds']:>9.1f}")
