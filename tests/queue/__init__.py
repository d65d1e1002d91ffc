"""Tests of engine/queue: the job queue on SQLite and PostgreSQL, leases, shared events, worker processes."""
