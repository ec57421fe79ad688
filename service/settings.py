"""Gateway settings: one `Settings(BaseSettings)` read from `ONEREC_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from onerec.serving import layout


class Settings(BaseSettings):
    """Everything the gateway reads from its environment (`ONEREC_REDIS_URL`, `ONEREC_TRITON_URL`, ...)."""

    model_config = SettingsConfigDict(env_prefix="ONEREC_", extra="ignore", frozen=True)

    # Redis history store (DESIGN.md §4): LIST `{history_prefix}{{user_id}}` (a hash tag: one slot per user),
    # most recent first, capped. In cluster mode `redis_url` names one seed node; the client reads the slot map.
    redis_mode: Literal["standalone", "cluster"] = Field("standalone", description="one Redis, or a Redis Cluster")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_wait_replicas: int = Field(0, ge=0, description="replicas that must hold an event (Redis WAIT) before "
                                     "/events answers 200: 1 with replicas, so a dead master loses none")
    history_prefix: str = "onerec:history:"
    history_len: int = Field(256, ge=1, le=4096, description="videos kept per user and read per request")
    redis_timeout_s: float = Field(0.25, gt=0, description="bound on each Redis command")
    served_prefix: str = Field("onerec:served:", description="per-minute HyperLogLog of the videos served")
    # Global blocklist (DESIGN.md §4): SET of video ids never served; re-read at most every blocklist_ttl_s, so a
    # blocked video is gone from every answer within blocklist_ttl_s + redis_timeout_s (the README promises 5 s).
    blocked_key: str = Field("onerec:blocked", description="Redis SET of blocked video ids")
    blocklist_ttl_s: float = Field(1.0, gt=0, le=2.0, description="how long a read of the blocklist is reused")
    new_item_share: float = Field(0.0, ge=0.0, le=1.0, description="share of the 5 slots (rounded up) that new items "
                                  "(never a training positive, e.g. from `onerec catalog add`) sharing a generated "
                                  "item's first L-1 codes may take, placed after it (TIGER's cold-start retrieval); "
                                  "0 = off")
    max_banned_sids: int = Field(16384, ge=0, description="excluded and blocked SIDs banned inside the beam search "
                                 "per request (the rest are filtered from the answer)")

    # Triton model `onerec` and the repository its catalog is read from. Several replicas: a comma-separated
    # list, or a name resolving to several addresses (a Kubernetes headless Service), re-resolved at every sync.
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC host:port, or several, comma-separated")
    triton_attempts: int = Field(3, ge=1, description="replicas one request may try (each at most once) when "
                                 "one is unavailable, times out, is overloaded or lacks the pinned version")
    model_name: str = layout.MODEL_NAME
    model_repo: Path = Path("model_repo")
    beam_width: int = Field(layout.DEFAULT_BEAM_WIDTH, ge=1, le=layout.MAX_BEAM_WIDTH)
    num_sessions: int = Field(layout.DEFAULT_NUM_SESSIONS, ge=1, le=layout.MAX_BEAM_WIDTH,
                              description="generated sessions asked for (backfill pool)")
    triton_timeout_s: float = Field(2.0, gt=0, description="deadline of one inference call")
    breaker_failures: int = Field(3, ge=1, description="consecutive Triton failures that open the circuit")
    breaker_reset_s: float = Field(1.0, gt=0, description="seconds the circuit stays open before one probe")
    sync_interval_s: float = Field(5.0, gt=0, description="how often the served model version is re-checked")

    # Admission and abuse limits.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated; empty = open")
    max_concurrency: int = Field(64, ge=1, description="requests in flight before 503 + Retry-After")
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503s")

    @field_validator("triton_url")
    @classmethod
    def _triton_targets(cls, value: str) -> str:
        from service.model_client import split_target  # here: reading settings does not import gRPC

        targets = [target.strip() for target in value.split(",") if target.strip()]
        if not targets:
            raise ValueError("give at least one Triton gRPC endpoint, host:port")
        for target in targets:
            split_target(target)
        return ",".join(targets)

    @property
    def triton_targets(self) -> list[str]:
        """Every Triton endpoint of `triton_url` (host:port; a name may stand for several replicas)."""
        return self.triton_url.split(",")

    @field_validator("history_prefix", "served_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or }: the key's hash tag is added after it")
        return value

    @model_validator(mode="after")
    def _cluster_url(self) -> Settings:
        if self.redis_mode == "cluster":
            url = urlparse(self.redis_url)
            if url.scheme not in ("redis", "rediss") or url.path not in ("", "/", "/0"):
                raise ValueError(f"redis_url {self.redis_url!r}: a cluster seed is redis://host:port (database 0 "
                                 "only: Redis Cluster has no other)")
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
