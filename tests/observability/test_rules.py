"""The Prometheus alerting rules (observability/prometheus/rules.yml): promtool accepts them, its rule unit tests
(tests/observability/rules_test.yml) pass, every gateway series they read exists, and every place that runs
Prometheus loads them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from service.metrics import Metrics
from stack.prometheus import OBSERVABILITY, PROMETHEUS_CONFIG, local_config, promtool_binary
from tests.tools import require_tool

RULES = OBSERVABILITY / "prometheus" / "rules.yml"
RULE_TESTS = Path(__file__).with_name("rules_test.yml")
REPO = Path(__file__).resolve().parents[2]
GATEWAY_SERIES = re.compile(r"\bonerec_gateway_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def promtool(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(require_tool(promtool_binary)), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules():
    done = promtool("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_the_rule_unit_tests_pass():
    """Each alert fires on its series after its `for` and not before, cold-start fallbacks excluded (promtool)."""
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_threshold_fails_the_unit_tests(tmp_path: Path):
    """The unit tests pin the thresholds: 1% of 5xx made 5% no longer fires where the test expects it."""
    changed = tmp_path / "observability" / "prometheus"
    changed.mkdir(parents=True)
    (changed / "rules.yml").write_text(RULES.read_text().replace("> 0.01", "> 0.05"))
    tests_dir = tmp_path / "tests" / "observability"
    tests_dir.mkdir(parents=True)
    (tests_dir / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    done = promtool("test", "rules", tests_dir / RULE_TESTS.name)
    assert done.returncode != 0 and "OneRecHigh5xxRate" in done.stdout + done.stderr


def test_every_gateway_series_the_rules_read_is_exported():
    exported = {metric.name for metric in Metrics().registry.collect()}
    read = {name for rule in alerts() for name in GATEWAY_SERIES.findall(rule["expr"])}
    unknown = sorted(name for name in read if not any(
        name == e or name.removesuffix(s) == e for e in exported for s in SUFFIXES))
    assert read and not unknown, unknown


def test_every_alert_has_a_severity_and_a_summary():
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_committed_and_the_local_configs_load_the_rules():
    committed = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [PROMETHEUS_CONFIG.parent / f for f in committed["rule_files"]] == [RULES]
    local = yaml.safe_load(local_config({"gateway": "127.0.0.1:1"}))
    assert local["rule_files"] == [str(RULES)]  # absolute: the local config is written elsewhere


def test_compose_mounts_the_rules_beside_the_config():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./observability/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in volumes
