"""The local Prometheus launcher against a tiny static /metrics endpoint on loopback (no gateway, no Triton)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stack.probes import free_ports
from stack.prometheus import PrometheusError, PrometheusServer, local_config, prometheus_binary
from tests.tools import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
EXPOSITION = b"# TYPE demo_requests_total counter\ndemo_requests_total{route=\"/recommend\"} 42\n"


class MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics: a fixed exposition; anything else 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(EXPOSITION)))
        self.end_headers()
        self.wfile.write(EXPOSITION)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's signature)
        pass


@pytest.fixture
def metrics_endpoint() -> Iterator[str]:
    """host:port of a /metrics endpoint served from a thread for the test's duration."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def prometheus(metrics_endpoint: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    require_tool(prometheus_binary)
    config = local_config({"gateway": metrics_endpoint, "triton": metrics_endpoint}, 0.5)
    server = PrometheusServer(tmp_path / "prometheus", free_ports(1)[0], config)
    server.start(timeout=30)
    yield server
    server.stop(timeout=10)


def test_scrapes_the_committed_jobs_and_answers_queries(prometheus: PrometheusServer, metrics_endpoint: str):
    targets = prometheus.wait_for_targets_up(timeout=20)
    assert {(t["job"], t["instance"]) for t in targets} == {("gateway", metrics_endpoint),
                                                             ("triton", metrics_endpoint)}
    up = prometheus.query("up")
    assert sorted((s["metric"]["job"], s["value"][1]) for s in up) == [("gateway", "1"), ("triton", "1")]
    demo = prometheus.wait_for_data('demo_requests_total{job="gateway"}', timeout=10)
    assert [(s["metric"]["route"], s["value"][1]) for s in demo] == [("/recommend", "42")]
    assert prometheus.query("scalar(vector(2))")[1] == "2"


def test_a_bad_query_raises_with_prometheus_text(prometheus: PrometheusServer):
    with pytest.raises(PrometheusError, match="parse error"):
        prometheus.query("sum(rate(up[1m])")


def test_stop_ends_the_process(prometheus: PrometheusServer):
    assert prometheus.alive()
    assert prometheus.stop(timeout=10) == 0
    assert not prometheus.alive()
