"""The committed Prometheus config and Grafana dashboards: structure, provisioning, promtool, query extraction."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from onerec.errors import UsageError
from stack import prometheus as prometheus_server
from stack.prometheus import (
    DASHBOARDS,
    OBSERVABILITY,
    PROMETHEUS_CONFIG,
    DashboardQuery,
    dashboard_queries,
    duration,
    grafana_to_promql,
    iter_panels,
    local_config,
    promtool_binary,
)
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
PROVISIONING = OBSERVABILITY / "grafana" / "provisioning"
GRAFANA_DASHBOARD_MOUNT = "/var/lib/grafana/dashboards"
EXPECTED_UIDS = {"gateway.json": "onerec-gateway", "model.json": "onerec-model", "quality.json": "onerec-quality"}
RANGE_SELECTOR = re.compile(r"\[([^\]]*)\]")


def load_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def provisioned(kind: str) -> list[dict]:
    """Every entry of the provisioning YAML files of `kind` (datasources or dashboards providers)."""
    key = {"datasources": "datasources", "dashboards": "providers"}[kind]
    return [entry for path in sorted((PROVISIONING / kind).glob("*.yml"))
            for entry in yaml.safe_load(path.read_text())[key]]


def datasource_uid() -> str:
    (source,) = provisioned("datasources")
    return source["uid"]


needs_tool = require_tool


DASHBOARD_FILES = sorted(EXPECTED_UIDS)


# --- provisioning -------------------------------------------------------------------------------------------


def test_one_prometheus_datasource_with_a_fixed_uid():
    (source,) = provisioned("datasources")
    assert source["type"] == "prometheus" and source["uid"] == "onerec-prometheus"
    assert source["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape, "$__rate_interval must know Prometheus's scrape interval"


def test_dashboard_provider_reads_the_compose_mount():
    (provider,) = provisioned("dashboards")
    assert provider["type"] == "file" and provider["options"]["path"] == GRAFANA_DASHBOARD_MOUNT


def compose_volumes(service: str) -> dict[str, str]:
    """{host path relative to the repo: container path} of one docker-compose.yml service's bind mounts."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {}
    for volume in compose["services"][service].get("volumes", []):
        source, target = (volume.split(":")[:2] if isinstance(volume, str)
                          else (volume.get("source", ""), volume.get("target", "")))
        mounts[source.removeprefix("./")] = target
    return mounts


def test_compose_mounts_the_committed_files():
    grafana = compose_volumes("grafana")
    assert grafana["observability/grafana/dashboards"] == GRAFANA_DASHBOARD_MOUNT
    assert grafana["observability/grafana/provisioning"] == "/etc/grafana/provisioning"
    prometheus = compose_volumes("prometheus")
    assert "/etc/prometheus/prometheus.yml" in prometheus.get("observability/prometheus/prometheus.yml", "")


# --- dashboards ---------------------------------------------------------------------------------------------


def test_the_three_dashboards_with_fixed_uids():
    assert {name: d["uid"] for name, d in load_dashboards().items()} == EXPECTED_UIDS


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_panel_ids_unique_and_types_known(name: str):
    dashboard = load_dashboards()[name]
    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    assert {p["type"] for p in panels} <= {"timeseries", "stat"}
    assert dashboard["schemaVersion"] >= 39  # Grafana 11
    assert all(p["title"] and p["gridPos"]["w"] > 0 for p in panels)


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_panel_and_target_uses_the_provisioned_datasource(name: str):
    expected = {"type": "prometheus", "uid": datasource_uid()}
    for panel in iter_panels(load_dashboards()[name]["panels"]):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == expected, (panel["title"], target["refId"])
            assert target["expr"].strip(), (panel["title"], target["refId"])


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_ref_ids_unique_within_a_panel(name: str):
    for panel in iter_panels(load_dashboards()[name]["panels"]):
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_queries_use_rate_interval_and_no_gpu_or_template_variables():
    queries = dashboard_queries()
    assert len(queries) >= 15 and {q.dashboard_uid for q in queries} == set(EXPECTED_UIDS.values())
    for q in queries:
        assert set(RANGE_SELECTOR.findall(q.expr)) <= {"$__rate_interval"}, q
        assert "nv_gpu_" not in q.expr, f"{q}: GPU metrics return nothing on CPU"
        assert "$" not in grafana_to_promql(q.expr), q


def test_the_model_dashboard_says_why_there_is_no_gpu_panel():
    assert "GPU" in load_dashboards()["model.json"]["description"]


def test_every_query_parses_as_promql(tmp_path: Path):
    """promtool parses each expression as a recording rule: a syntax check without a running Prometheus."""
    promtool = needs_tool(promtool_binary)
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:q{i}", "expr": grafana_to_promql(q.expr)} for i, q in enumerate(queries)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard_queries and grafana_to_promql ----------------------------------------------------------------


def test_dashboard_queries_include_panels_nested_in_rows(tmp_path: Path):
    dashboard = {"uid": "t", "panels": [
        {"id": 1, "type": "stat", "title": "top", "targets": [{"refId": "A", "expr": "up"}]},
        {"id": 2, "type": "row", "title": "row", "collapsed": True, "panels": [
            {"id": 3, "type": "timeseries", "title": "nested",
             "targets": [{"refId": "A", "expr": "a"}, {"refId": "B", "expr": "b"}]}]},
        {"id": 4, "type": "text", "title": "no targets"},
    ]}
    (tmp_path / "t.json").write_text(json.dumps(dashboard))
    (tmp_path / "notes.txt").write_text("not a dashboard")
    assert dashboard_queries(tmp_path) == [
        DashboardQuery("t", 1, "top", "A", "up"),
        DashboardQuery("t", 3, "nested", "A", "a"),
        DashboardQuery("t", 3, "nested", "B", "b"),
    ]


@pytest.mark.parametrize(("expr", "expected"), [
    ("rate(x[$__rate_interval])", "rate(x[30s])"),
    ("rate(x[${__rate_interval}])", "rate(x[30s])"),
    ("avg_over_time(x[$__interval])", "avg_over_time(x[30s])"),
    ("increase(x[$__range]) / rate(y[$__rate_interval])", "increase(x[5m]) / rate(y[30s])"),
    ('sum(rate(x{route=~"/recommend$"}[$__rate_interval]))', 'sum(rate(x{route=~"/recommend$"}[30s]))'),
    ("up", "up"),
])
def test_grafana_to_promql(expr: str, expected: str):
    assert grafana_to_promql(expr) == expected


def test_grafana_to_promql_explicit_windows():
    expr = "rate(x[$__rate_interval]) + rate(y[$__interval]) + increase(z[$__range])"
    assert grafana_to_promql(expr, rate_interval="4s", interval="1s", range_="1h") == (
        "rate(x[4s]) + rate(y[1s]) + increase(z[1h])")


@pytest.mark.parametrize("expr", ['up{job="$job"}', "rate(x[$__interval_ms])", "rate(x[${window}])"])
def test_grafana_to_promql_refuses_unknown_variables(expr: str):
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        grafana_to_promql(expr)


# --- the Prometheus config ----------------------------------------------------------------------------------


def scrape_jobs(text: str) -> dict[str, dict]:
    return {job["job_name"]: job for job in yaml.safe_load(text)["scrape_configs"]}


def test_committed_config_scrapes_gateway_and_every_triton_replica_on_the_compose_network():
    jobs = scrape_jobs(PROMETHEUS_CONFIG.read_text())
    assert jobs["gateway"]["static_configs"] == [{"targets": ["gateway:8080"]}]
    assert jobs["gateway"]["metrics_path"] == "/metrics"
    # every address the compose service name resolves to (one per `--scale triton=N` container)
    (discovery,) = jobs["triton"]["dns_sd_configs"]
    assert (discovery["names"], discovery["type"], discovery["port"]) == (["triton"], "A", 8002)
    assert "static_configs" not in jobs["triton"]


SERVICE_DISCOVERY = ("static_configs", "dns_sd_configs")


def test_local_config_swaps_targets_and_intervals_only():
    text = local_config({"gateway": "127.0.0.1:1234", "triton": ["127.0.0.1:5678", "127.0.0.1:5688"]}, 0.5)
    local, committed = yaml.safe_load(text), yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert local["global"]["scrape_interval"] == local["global"]["scrape_timeout"] == "500ms"
    jobs = scrape_jobs(text)
    assert jobs["gateway"]["static_configs"] == [{"targets": ["127.0.0.1:1234"]}]
    assert jobs["triton"]["static_configs"] == [{"targets": ["127.0.0.1:5678", "127.0.0.1:5688"]}]
    assert "dns_sd_configs" not in jobs["triton"]
    for name, job in scrape_jobs(PROMETHEUS_CONFIG.read_text()).items():
        assert {k: v for k, v in jobs[name].items() if k not in SERVICE_DISCOVERY} == {
            k: v for k, v in job.items() if k not in (*SERVICE_DISCOVERY, "scrape_interval", "scrape_timeout")}
    assert local["global"]["external_labels"] == committed["global"]["external_labels"]


def test_local_config_keeps_the_committed_intervals_unless_asked():
    local = yaml.safe_load(local_config({"triton": "127.0.0.1:5678"}))
    committed = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert local["global"] == committed["global"]
    assert scrape_jobs(local_config({"triton": "127.0.0.1:5678"}))["gateway"] == scrape_jobs(
        PROMETHEUS_CONFIG.read_text())["gateway"]


def test_local_config_refuses_an_unknown_job():
    with pytest.raises(ValueError, match="redis"):
        local_config({"redis": "127.0.0.1:1"}, 1.0)


@pytest.mark.parametrize(("seconds", "text"), [(1.0, "1s"), (15, "15s"), (0.5, "500ms"), (1.25, "1250ms")])
def test_duration(seconds: float, text: str):
    assert duration(seconds) == text


def test_duration_must_be_positive():
    with pytest.raises(ValueError):
        duration(0)


@pytest.mark.parametrize("local", [False, True], ids=["committed", "local"])
def test_promtool_accepts_the_config(local: bool, tmp_path: Path):
    promtool = needs_tool(promtool_binary)
    path = PROMETHEUS_CONFIG
    if local:
        path = tmp_path / "prometheus.yml"
        path.write_text(local_config({"gateway": "127.0.0.1:8080", "triton": ["127.0.0.1:8002", "127.0.0.1:8012"]},
                                     1.0))
    result = subprocess.run([str(promtool), "check", "config", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_binaries_name_make_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(prometheus_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(prometheus_server, "TOOLS_BIN", tmp_path)
    for find in (prometheus_server.prometheus_binary, prometheus_server.promtool_binary):
        with pytest.raises(UsageError, match="make tools"):
            find()


def test_tools_dir_is_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(prometheus_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(prometheus_server, "TOOLS_BIN", tmp_path)
    (tmp_path / "prometheus").write_text("")
    assert prometheus_server.prometheus_binary() == tmp_path / "prometheus"
