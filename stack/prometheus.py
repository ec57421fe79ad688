"""A local Prometheus (Debian's package) on the committed scrape config, and the Grafana dashboards' queries."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from onerec.errors import UsageError
from stack.child import ChildProcess
from stack.probes import http_ok

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = REPO_ROOT / "observability"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus" / "prometheus.yml"
DASHBOARDS = OBSERVABILITY / "grafana" / "dashboards"
TOOLS_BIN = REPO_ROOT / ".tools" / "prometheus" / "usr" / "bin"  # where scripts/install-tools.sh unpacks the .deb
SCRAPE_JOBS = ("gateway", "triton")
GRAFANA_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)")  # ${name}, ${name:fmt}, $name


# --- binaries -----------------------------------------------------------------------------------------------


def _tool(name: str) -> Path:
    found = shutil.which(name)
    if found:
        return Path(found)
    candidate = TOOLS_BIN / name
    if candidate.is_file():
        return candidate
    raise UsageError(f"{name}: not on PATH and not in {TOOLS_BIN} (run `make tools`)")


def prometheus_binary() -> Path:
    """`prometheus` on PATH, else the one `make tools` unpacked from Debian's package into .tools/."""
    return _tool("prometheus")


def promtool_binary() -> Path:
    """`promtool` on PATH, else the one `make tools` unpacked from Debian's package into .tools/."""
    return _tool("promtool")


# --- config -------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A Prometheus duration string: whole seconds as `5s`, anything finer in milliseconds (`250ms`)."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"duration must be positive, got {seconds}s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def local_config(targets: dict[str, str | list[str]], scrape_interval_s: float | None = None,
                 source: Path = PROMETHEUS_CONFIG) -> str:
    """The committed prometheus.yml with each job's targets replaced by `targets[job]` (host:port, or a list: one
    target, i.e. one `instance`, per Triton replica) as static targets in place of the job's service discovery,
    and, when given, the scrape interval (and timeout) shortened to `scrape_interval_s`, the rule files by
    absolute path; as YAML text: the tests and the local stack run the committed config."""
    config = yaml.safe_load(Path(source).read_text())
    unknown = set(targets) - {job["job_name"] for job in config["scrape_configs"]}
    if unknown:
        raise ValueError(f"{source}: no scrape job named {sorted(unknown)}")
    if scrape_interval_s is not None:
        interval = duration(scrape_interval_s)
        config.setdefault("global", {}).update(scrape_interval=interval, scrape_timeout=interval,
                                               evaluation_interval=interval)
    # written elsewhere (RUN/stack/, a test's tmp dir): the committed rule files by absolute path
    config["rule_files"] = [str((Path(source).parent / f).resolve()) for f in config.get("rule_files", [])]
    for job in config["scrape_configs"]:
        if scrape_interval_s is not None:
            job.pop("scrape_interval", None)
            job.pop("scrape_timeout", None)
        if job["job_name"] in targets:
            wanted = targets[job["job_name"]]
            for key in [key for key in job if key.endswith("_sd_configs")]:
                del job[key]
            job["static_configs"] = [{"targets": [wanted] if isinstance(wanted, str) else list(wanted)}]
    return yaml.safe_dump(config, sort_keys=False)


# --- the server ---------------------------------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """Prometheus's HTTP API answered with an error (its `errorType: error` text), or did not answer."""


class PrometheusServer(ChildProcess):
    """One prometheus on 127.0.0.1:`port` with its config and TSDB in `workdir`, its log in `workdir/prometheus.log`.

    `config` is YAML text (see `local_config`) written to `workdir/prometheus.yml`."""

    def __init__(self, workdir: Path, port: int, config: str, host: str = "127.0.0.1") -> None:
        self.workdir, self.port, self.config, self.host = Path(workdir), port, config, host
        self.log_path = self.workdir / "prometheus.log"
        self.config_path = self.workdir / "prometheus.yml"
        self.name = "prometheus"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [str(prometheus_binary()),
                f"--config.file={self.config_path.resolve()}",
                f"--storage.tsdb.path={(self.workdir / 'data').resolve()}",
                f"--web.listen-address={self.host}:{self.port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=info"]

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Start and return once /-/ready answers 200."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        self.spawn(self.command())
        self.wait_ready(lambda: http_ok(f"{self.url}/-/ready", timeout=1.0), timeout, poll=0.1)
        log.info("prometheus ready on %s (log: %s)", self.url, self.log_path)
        return self

    def api(self, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
        """GET /api/v1/`path`; its `data`, or PrometheusError with Prometheus's error text."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL we built)
                body = json.loads(response.read())
        except urllib.error.HTTPError as e:  # 400/422/503 carry the same JSON envelope
            try:
                body = json.loads(e.read())
            except ValueError:
                raise PrometheusError(f"{path}: HTTP {e.code}") from e
        except (urllib.error.URLError, OSError) as e:
            raise PrometheusError(f"{path}: prometheus did not answer ({e})") from e
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params or ''}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list:
        """An instant query (`/api/v1/query`): the result list (vector samples, or [t, value] for a scalar)."""
        params = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        return self.api("query", params)["result"]

    def targets(self) -> list[dict]:
        """The active scrape targets (job, instance, health, lastError)."""
        active = self.api("targets", {"state": "active"})["activeTargets"]
        return [{"job": t["labels"].get("job"), "instance": t["labels"].get("instance"), "health": t["health"],
                 "lastError": t.get("lastError", "")} for t in active]

    def wait_for_targets_up(self, timeout: float = 30.0) -> list[dict]:
        """Return the active targets once every one of them has been scraped successfully; RuntimeError otherwise."""
        deadline = time.monotonic() + timeout
        targets: list[dict] = []
        while time.monotonic() < deadline:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            time.sleep(0.2)
        raise RuntimeError(f"prometheus targets not all up after {timeout:.0f}s: {targets}")

    def wait_for_data(self, expr: str, timeout: float = 30.0) -> list:
        """Poll `expr` until it returns a non-empty result (e.g. a rate() needs two scrapes); RuntimeError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.2)
        raise RuntimeError(f"prometheus: no data for {expr!r} after {timeout:.0f}s")

    def __enter__(self) -> PrometheusServer:
        return self.start()


# --- dashboards ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL target of one panel of one Grafana dashboard."""

    dashboard_uid: str
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, depth first, including the panels nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def queries_of(dashboard: dict) -> list[DashboardQuery]:
    """Every `targets[].expr` of every panel of one dashboard (as JSON-decoded)."""
    return [DashboardQuery(dashboard["uid"], panel["id"], panel.get("title", ""), target.get("refId", ""),
                           target.get("expr", ""))
            for panel in iter_panels(dashboard.get("panels", [])) for target in panel.get("targets", [])]


def dashboard_queries(directory: Path = DASHBOARDS) -> list[DashboardQuery]:
    """The queries of every `*.json` dashboard in `directory`, in file-name order."""
    return [q for path in sorted(Path(directory).glob("*.json")) for q in queries_of(json.loads(path.read_text()))]


def grafana_to_promql(expr: str, rate_interval: str = "30s", interval: str | None = None,
                      range_: str = "5m") -> str:
    """`expr` with Grafana's built-in variables substituted, so it runs in plain Prometheus: `$__rate_interval` →
    `rate_interval`, `$__interval` → `interval` (default: `rate_interval`), `$__range` → `range_`. Any other
    `$variable` (the dashboards define no template variables) raises ValueError."""
    values = {"__rate_interval": rate_interval, "__interval": interval or rate_interval, "__range": range_}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return GRAFANA_VARIABLE.sub(substitute, expr)
