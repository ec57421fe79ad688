"""The gateway's request and response bodies (pydantic v2): what `/docs` shows and what clients rely on."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

SESSION_ITEMS = 5  # videos in every /recommend answer
MAX_OVERRIDE_HISTORY = 1024  # longest `history` a caller may send (only the most recent history_len are used)
MAX_EVENT_VIDEOS = 256  # videos per /events call
MAX_EXCLUDE = 1024  # videos a caller may exclude from one answer
USER_ID_PATTERN = r"^[A-Za-z0-9_:.\-]{1,128}$"

UserId = Annotated[str, Field(min_length=1, max_length=128, pattern=USER_ID_PATTERN,
                              description="1-128 characters of [A-Za-z0-9_:.-]", examples=["196"])]
MAX_VIDEO_ID = 2**63 - 1  # int64: what numpy, Redis and the catalog hold


def _whole_number(value: object) -> object:
    """JSON Schema's integer: `3.0` is the number 3 (draft 2020-12, which OpenAPI 3.1 uses), so it is read as 3."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Strict: a boolean, a string or a fractional number is not a video id (lax pydantic read `false` as 0, "3" as 3).
VideoId = Annotated[int, Strict(), Field(ge=0, le=MAX_VIDEO_ID, description="catalog video id (int64, >= 0)"),
                    BeforeValidator(_whole_number)]  # last, or pydantic drops ge/le from the JSON schema


class _Strict(BaseModel):
    """Request bodies: unknown fields and coerced types are 422s (strict: `1` is not a boolean, `196` no user id)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Strict):
    user_id: UserId
    exclude_seen: bool = Field(True, description="never return a video from the user's history")
    history: list[VideoId] | None = Field(
        None, max_length=MAX_OVERRIDE_HISTORY,
        description="override the Redis history: video ids, most recent first (testing, callers with their own "
                    "history store)")
    exclude: list[VideoId] = Field(
        default_factory=list, max_length=MAX_EXCLUDE,
        description="videos this answer must not hold, from any source (ids the catalog does not know are ignored)")


class Item(BaseModel):
    video_id: int
    rank: int = Field(description="1 = best")


class RecommendResponse(BaseModel):
    user_id: str
    items: list[Item] = Field(description=f"exactly {SESSION_ITEMS} distinct videos (fewer only when the catalog "
                                          "holds fewer videos that are neither excluded nor blocked)")
    source: Literal["model", "popular"]
    model_version: str | None = Field(description="the Triton model version whose catalog mapped the answer")
    request_id: str
    fallback_reason: str | None = Field(
        None, description="why popular items were served: cold_start, redis_unavailable, triton_unavailable, "
                          "triton_timeout, triton_overloaded, triton_error, circuit_open, catalog_mismatch")


class EventsRequest(_Strict):
    user_id: UserId
    video_ids: list[VideoId] = Field(
        min_length=1, max_length=MAX_EVENT_VIDEOS, description="watched videos in watch order, the last most recent")


class EventsResponse(BaseModel):
    user_id: str
    stored: int = Field(description="videos appended (acknowledged by Redis)")
    history_length: int = Field(description="the user's history length after the append (capped)")
    request_id: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    redis: bool
    triton: bool
    catalog: bool = Field(description="the catalog of the served model version is loaded and its hash matches")
    model_version: str | None = Field(description="the primary version (every user not in the canary)")
    canary_version: str | None = Field(None, description="the candidate version during a canary, else null")
    canary_share: float = Field(0.0, description="share of users the candidate answers (0 without a canary)")
    detail: str | None = None


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable error code")
    message: str
    field: str | None = Field(None, description="the offending request field, when there is one")
    request_id: str | None = None
