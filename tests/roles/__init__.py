"""Tests of bot/roles and the supervisor: run, serve, worker processes, metrics."""
