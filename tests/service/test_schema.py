"""Schemathesis against the app's OpenAPI schema (in-process ASGI, fakes behind): no 5xx, no undocumented code."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import build_gateway
from tests.service.fakes import FakeStore

gateway = build_gateway(store=FakeStore({"u1": [30]}))
schema = schemathesis.openapi.from_asgi("/openapi.json", gateway.app)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_no_5xx_and_only_documented_status_codes(case):
    case.call_and_validate(checks=CHECKS)
