"""`onerec block | unblock`: the global blocklist, the Redis SET every gateway re-reads within a second or two."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import JsonOption, user_errors
from onerec.errors import UsageError

app = typer.Typer()

VideosArgument = Annotated[list[int], typer.Argument(help="Video ids (integers >= 0).", show_default=False)]
RedisOption = Annotated[str, typer.Option(envvar="ONEREC_REDIS_URL", help="The gateway's Redis.")]
KeyOption = Annotated[str, typer.Option(envvar="ONEREC_BLOCKED_KEY", help="The blocklist SET.")]
ModeOption = Annotated[str, typer.Option(envvar="ONEREC_REDIS_MODE",
                                         help="standalone, or cluster (--redis-url is then one seed node).")]


@app.command()
@user_errors
def block(videos: VideosArgument, redis_url: RedisOption = "redis://127.0.0.1:6379/0",
          redis_mode: ModeOption = "standalone", key: KeyOption = "onerec:blocked",
          as_json: JsonOption = False) -> None:
    """Block videos: within 5 s no gateway serves them, from any source (model, backfill, popular)."""
    _change(videos, redis_url, redis_mode, key, as_json, block=True)


@app.command()
@user_errors
def unblock(videos: VideosArgument, redis_url: RedisOption = "redis://127.0.0.1:6379/0",
            redis_mode: ModeOption = "standalone", key: KeyOption = "onerec:blocked",
            as_json: JsonOption = False) -> None:
    """Unblock videos: they can be served again within 5 s."""
    _change(videos, redis_url, redis_mode, key, as_json, block=False)


def _change(videos: list[int], redis_url: str, redis_mode: str, key: str, as_json: bool, block: bool) -> None:
    from service.blocklist import change_blocklist
    from service.history import REDIS_ERRORS, connect
    from service.schemas import MAX_VIDEO_ID

    bad = [v for v in videos if not 0 <= v <= MAX_VIDEO_ID]
    if bad:
        raise UsageError(f"VIDEO: {bad[0]} is not a video id (an integer in [0, 2**63 - 1])")
    if redis_mode not in ("standalone", "cluster"):
        raise UsageError(f"--redis-mode: {redis_mode!r} is neither standalone nor cluster")
    try:
        client = connect(redis_url, redis_mode, timeout=5)  # a cluster client reads the slot map here
    except REDIS_ERRORS as e:
        raise UsageError(f"--redis-url {redis_url}: {e}") from e
    try:
        change = change_blocklist(client, key, videos, block)
    except REDIS_ERRORS as e:
        raise UsageError(f"--redis-url {redis_url}: {e}") from e
    finally:
        client.close()
    verb, already = ("blocked", "already blocked") if block else ("unblocked", "not blocked")
    if as_json:
        typer.echo(json.dumps({"key": change.key, verb: change.changed, already.replace(" ", "_"): change.unchanged,
                               "size": change.size}))
        return
    typer.echo(f"{verb} {len(change.changed)} video(s), {len(change.unchanged)} {already}; "
               f"{change.size} blocked in {change.key}")
