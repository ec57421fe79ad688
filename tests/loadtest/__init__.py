"""Tests of the load-test package (loadtest/)."""
