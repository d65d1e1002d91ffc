"""The job queue: every job's state and its history in one database (SQLite or PostgreSQL), one transaction per
state change, and what processes tell each other through it (shared events, the workers' leases).

`JobQueue` (jobqueue.py) is the facade; its parts each own one concern: adding jobs (enqueue.py), claiming and
running them (claims.py), the workers' leases (leases.py), events shared between processes (shared.py), delivery
records (delivery.py), flags (flags.py), reading and statistics (reading.py), and what clean-up may remove
(retention.py). The SQL is written once for both databases (backend.py, sqlite.py, postgres.py); order.py holds the
fair order. bus.py is this process's event bus, follower.py hears other processes', fleet.py puts back the jobs of
workers that are gone.

May import: engine.errors, engine.jobs, engine.config, and the records of engine.storage.images. Never engine.pipeline,
engine.hub or bot.
"""
