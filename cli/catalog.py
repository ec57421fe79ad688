"""`onerec catalog add`: give new items SIDs with the trained codebooks and write the run's next catalog."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cli.common import JsonOption, RunOption, progress, user_errors
from onerec.runs import RunDir

app = typer.Typer(help="The run's catalog: add new items without retraining.", no_args_is_help=True)


class ItemsFormat(str, Enum):
    auto = "auto"
    npz = "npz"
    jsonl = "jsonl"
    movielens = "movielens"
    attributes = "attributes"


class Placement(str, Enum):
    codebook = "codebook"
    random = "random"


@app.command()
@user_errors
def add(
    run_dir: RunOption,
    items: Annotated[Path, typer.Option(
        "--items", help="New items: .npz (video_ids, embeddings in the tokenizer's space), .jsonl ({\"video_id\", "
        "\"embedding\"} or {\"video_id\", \"attributes\"} per line), MovieLens u.item (genres, year) or an Amazon "
        "*_item2attributes.json. Items already in the catalog are skipped; content files must describe them too "
        "(the content -> embedding map is learnt on them).")],
    fmt: Annotated[ItemsFormat, typer.Option("--format", help="Items file type (auto: by its name).")] = (
        ItemsFormat.auto),
    placement: Annotated[Placement, typer.Option(
        help="codebook: residual nearest centroid per level plus a free last code; random: a random free SID (a "
             "control for experiments).")] = Placement.codebook,
    known_prefixes: Annotated[bool, typer.Option(
        "--known-prefixes/--any-prefix", help="codebook: above the last level, prefer codes that extend a prefix the "
        "catalog has (the model never generates one it was not trained on).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the map's validation split and of random placement.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Give every item of --items that the run's catalog lacks a unique SID from the trained codebooks and write
    the extended catalog into RUN/catalog atomically (the replaced one is kept in RUN/catalogs/). The live
    repository is untouched: `onerec deploy --run RUN` serves it as the next version, sharing the weights."""
    from onerec.tokenizer.additions import AddConfig, add_items

    cfg = AddConfig(format=fmt.value, placement=placement.value, seed=seed, known_prefixes=known_prefixes)
    result = add_items(RunDir(run_dir), items, cfg, progress=progress())
    if as_json:
        typer.echo(json.dumps(result.as_json()))
        return
    if len(result.added) == 0:
        typer.echo(f"catalog add: every item of {items} is in the catalog already ({result.already_in_catalog}); "
                   "nothing written")
        return
    typer.echo(f"catalog add: {len(result.added)} new items ({result.already_in_catalog} already in the catalog), "
               f"catalog {result.previous_hash[:12]} -> {result.catalog.content_hash[:12]} "
               f"({result.catalog.num_items} items, {result.catalog.num_leaves} SIDs)")
    typer.echo(f"serve it with: onerec deploy --run {run_dir}")
