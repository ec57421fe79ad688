"""Tests of observability/: Prometheus config, Grafana provisioning and dashboards, the local Prometheus."""
