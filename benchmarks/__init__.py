"""Benchmarks: scripts run by hand or by `make bench`; importable for the CLI and the tests."""
