"""The gateway's Prometheus metrics (prometheus-client), one registry per app; multiprocess-aware `/metrics`."""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Around the SLO: a CPU beam-128 request takes ~0.1-0.5 s, a GPU one ~10-50 ms, fallbacks ~1 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0)
HISTORY_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 150, 200, 256)
STAGES = ("redis", "triton", "mapping")
FALLBACK_REASONS = ("cold_start", "redis_unavailable", "triton_unavailable", "triton_timeout", "triton_overloaded",
                    "triton_error", "circuit_open", "catalog_mismatch", "version_unavailable")
REJECT_REASONS = ("overloaded", "body_too_large")


class Metrics:
    """Every series the gateway exports; names are what the Grafana dashboards query."""

    def __init__(self, routes: Iterable[str] = ()) -> None:
        self.routes = frozenset(routes)  # the route label values (create_app reads them off the router)
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "onerec_gateway_request_seconds", "HTTP request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("onerec_gateway_requests", "HTTP responses by route and status", ["route", "status"],
                                registry=r)
        # Every /recommend series carries `model_version` (the version that answered: the primary, or the canary
        # for its users), so the model dashboard compares a canary with the primary; its values are the versions
        # served since the process started (a handful).
        v = "model_version"
        self.recommend_seconds = Histogram(
            "onerec_gateway_recommend_seconds", "/recommend latency inside the gateway, by answering version", [v],
            buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram(
            "onerec_gateway_stage_seconds", "Latency of one /recommend stage (redis, triton, mapping)", ["stage", v],
            buckets=LATENCY_BUCKETS, registry=r)
        self.recommendations = Counter("onerec_gateway_recommendations", "/recommend answers by source",
                                       ["source", v], registry=r)
        self.fallbacks = Counter("onerec_gateway_fallbacks", "Popular answers by reason", ["reason", v], registry=r)
        self.unknown_videos = Counter("onerec_gateway_unknown_videos",
                                      "History videos not in the served catalog (dropped)", [v], registry=r)
        self.backfilled_items = Counter("onerec_gateway_backfilled_items",
                                        "Items taken from later sessions or popularity", [v], registry=r)
        self.new_items = Counter("onerec_gateway_new_items",
                                 "New items placed by prefix match (ONEREC_NEW_ITEM_SHARE)", [v], registry=r)
        self.model_items = Counter("onerec_gateway_model_items", "Items taken from the best generated session",
                                   [v], registry=r)
        self.invalid_sids = Counter("onerec_gateway_invalid_sids", "Generated SIDs not in the catalog (must stay 0)",
                                    [v], registry=r)
        self.collision_hits = Counter("onerec_gateway_collision_hits",
                                      "Best-session items whose SID several videos share", [v], registry=r)
        self.history_length = Histogram("onerec_gateway_history_length", "Known history items sent to the model",
                                         [v], buckets=HISTORY_BUCKETS, registry=r)
        self.catalog_mismatches = Counter("onerec_gateway_catalog_mismatches",
                                          "Times the served model's catalog hash did not match", registry=r)
        self.rejected = Counter("onerec_gateway_rejected", "Requests refused before work, by reason", ["reason"],
                                registry=r)
        self.events_stored = Counter("onerec_gateway_events_stored", "Videos appended to histories", registry=r)
        self.unknown_excluded = Counter("onerec_gateway_unknown_excluded_videos",
                                        "Per-request `exclude` ids not in the served catalog (ignored)", [v],
                                        registry=r)
        self.blocklist_size = Gauge("onerec_gateway_blocklist_size", "Videos in the global blocklist (last read)",
                                    multiprocess_mode="max", registry=r)
        self.blocklist_stale = Gauge("onerec_gateway_blocklist_stale",
                                     "1 while Redis does not answer and the last known blocklist is in force",
                                     multiprocess_mode="livemax", registry=r)
        self.blocklist_refresh_failures = Counter("onerec_gateway_blocklist_refresh_failures",
                                                  "Blocklist reads Redis did not answer", registry=r)
        self.ready = Gauge("onerec_gateway_ready", "1 when Redis, Triton and the catalog are all ready",
                           multiprocess_mode="livemin", registry=r)
        self.breaker_open = Gauge("onerec_gateway_circuit_open", "1 while the Triton circuit breaker is open",
                                  multiprocess_mode="livemax", registry=r)
        self.unique_items = Gauge("onerec_gateway_unique_items_served",
                                  "Distinct videos returned by /recommend over the window (HyperLogLog in Redis)",
                                  ["window", v], multiprocess_mode="max", registry=r)
        self.catalog_items = Gauge("onerec_gateway_catalog_items", "Videos in the served catalog", [v],
                                   multiprocess_mode="max", registry=r)
        self.canary_share = Gauge("onerec_gateway_canary_share", "Share of users routed to the canary version",
                                  [v], multiprocess_mode="max", registry=r)
        self.in_flight = Gauge("onerec_gateway_in_flight", "Requests being served", multiprocess_mode="livesum",
                               registry=r)

    def initialise(self) -> None:
        """Every known label value at 0, so rate() over them has data before the first event (dashboards)."""
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def initialise_version(self, version: str) -> None:
        """The series of one model version at 0 (called when the gateway pins it), for the same reason."""
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason, version)
        for source in ("model", "popular"):
            self.recommendations.labels(source, version)
        for stage in STAGES:
            self.stage_seconds.labels(stage, version)
        for counter in (self.unknown_videos, self.backfilled_items, self.model_items, self.invalid_sids,
                        self.collision_hits, self.unknown_excluded):
            counter.labels(version)
        self.recommend_seconds.labels(version)

    def route_label(self, path: str) -> str:
        return path if path in self.routes else "other"

    def exposition(self) -> bytes:
        """The text format: this process's registry, or every worker's when PROMETHEUS_MULTIPROC_DIR is set."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
