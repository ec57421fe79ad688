"""Schemathesis against the app's OpenAPI schema (in-process ASGI, fakes behind) with every check: no 5xx, only
documented status codes and bodies, schema-violating requests rejected and schema-valid ones accepted."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from tests.service.conftest import build_gateway
from tests.service.fakes import FakeStore

CONFIG = Path(__file__).resolve().parents[2] / "schemathesis.toml"  # what `schemathesis run` reads at the root
gateway = build_gateway(store=FakeStore({"u1": [30]}))
schema = schemathesis.openapi.from_asgi("/openapi.json", gateway.app, config=schemathesis.Config.from_path(CONFIG))
schema.config.checks.update(included_check_names=["all"])  # `schemathesis run --checks all`


def test_every_check_is_enabled():
    """Including negative_data_rejection and positive_data_acceptance, which are off by default."""
    from schemathesis.checks import CHECKS

    config = schema.config.checks_config_for()
    assert {"negative_data_rejection", "positive_data_acceptance"} <= set(CHECKS.get_all_names())
    assert all(config.get_by_name(name=name).enabled for name in CHECKS.get_all_names())
    assert "413" in config.negative_data_rejection.expected_statuses  # schemathesis.toml: over the size limit


@schema.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_all_checks_pass(case):
    case.call_and_validate()
