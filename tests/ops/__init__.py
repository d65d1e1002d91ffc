"""Tests of deploy/: the Grafana dashboard and the Prometheus alert rules against wanbot's /metrics."""
