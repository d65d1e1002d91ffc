"""The job queue's SQLite backend: one file in WAL mode through aiosqlite, one writer at a time (BEGIN IMMEDIATE).

Several processes on one machine may share the file: each write transaction takes SQLite's write lock first, so a
claim reads and changes the queue with nobody else writing in between; `busy_timeout` makes the others wait for it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from engine.errors import UserError
from engine.queue.backend import Row, check_schema, check_upgrade_alone
from engine.queue.processes import still_running

MIGRATIONS: list[str] = [
    # 1: jobs and their states.
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_key TEXT NOT NULL,
        source_json TEXT NOT NULL,
        dedup_key TEXT UNIQUE,
        mode TEXT NOT NULL,
        model TEXT NOT NULL,
        params_json TEXT NOT NULL,
        images_json TEXT NOT NULL DEFAULT '[]',
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        priority INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        passed_over INTEGER NOT NULL DEFAULT 0,
        error_user TEXT,
        error_detail TEXT,
        progress_json TEXT,
        result_json TEXT,
        retry_of INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_status ON jobs (status, priority, id);
    CREATE INDEX jobs_user_started ON jobs (user_key, started_at);
    CREATE TRIGGER jobs_terminal_states_are_final
    BEFORE UPDATE OF status ON jobs
    WHEN OLD.status IN ('succeeded', 'failed', 'cancelled') AND NEW.status != OLD.status
    BEGIN
        SELECT RAISE(ABORT, 'terminal job status cannot change');
    END;
    """,
    # 2: delivery tracking, image references for clean-up, an event log and queue-wide flags.
    """
    ALTER TABLE jobs ADD COLUMN delivery_status TEXT
        CHECK (delivery_status IN ('pending', 'delivered', 'delivery_failed'));
    ALTER TABLE jobs ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN delivery_error TEXT;
    ALTER TABLE jobs ADD COLUMN delivered_at REAL;
    CREATE TABLE job_images (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        sha256 TEXT NOT NULL,
        role TEXT NOT NULL,
        PRIMARY KEY (job_id, role)
    );
    CREATE INDEX job_images_sha ON job_images (sha256);
    INSERT INTO job_images (job_id, sha256, role)
        SELECT jobs.id, json_extract(image.value, '$.sha256'), json_extract(image.value, '$.role')
        FROM jobs, json_each(jobs.images_json) AS image;
    CREATE TABLE job_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        kind TEXT NOT NULL,
        at REAL NOT NULL,
        detail TEXT
    );
    CREATE TABLE queue_flags (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 3: indexes for the fair order (per user, queued only) and for the recent durations behind ETAs.
    """
    CREATE INDEX jobs_queued_per_user ON jobs (user_key, priority DESC, id) WHERE status = 'queued';
    CREATE INDEX jobs_succeeded ON jobs (finished_at) WHERE status = 'succeeded';
    """,
    # 4: whether the chat message of an ended job shows how it ended (a restart tells the ones that do not).
    """
    ALTER TABLE jobs ADD COLUMN final_shown INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET final_shown = 1 WHERE status IN ('succeeded', 'failed', 'cancelled');
    CREATE INDEX jobs_final_unshown ON jobs (finished_at) WHERE final_shown = 0
        AND status IN ('succeeded', 'failed', 'cancelled');
    """,
    # 5: chat updates stored before the platform is told they arrived, until they have been handled.
    """
    CREATE TABLE chat_inbox (
        platform TEXT NOT NULL,
        key TEXT NOT NULL,
        message_key TEXT,
        payload TEXT NOT NULL,
        reply TEXT,
        received_at REAL NOT NULL,
        done_at REAL,
        PRIMARY KEY (platform, key)
    );
    CREATE INDEX chat_inbox_open ON chat_inbox (platform, received_at) WHERE done_at IS NULL;
    CREATE INDEX chat_inbox_message ON chat_inbox (platform, message_key);
    """,
    # 6: which worker runs a job (its claim token checked on every write), the workers with their heartbeats, and
    # job events shared between processes (`wanbot serve` and `wanbot worker` on one machine).
    """
    ALTER TABLE jobs ADD COLUMN worker_id TEXT;
    ALTER TABLE jobs ADD COLUMN claim_token TEXT;
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        machine TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL,
        device TEXT NOT NULL,
        gpu_name TEXT,
        free_memory_bytes INTEGER,
        loaded_model TEXT,
        downloading_json TEXT NOT NULL DEFAULT '[]',
        current_job INTEGER,
        state TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    CREATE TABLE queue_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        origin TEXT NOT NULL,
        kind TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        detail TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX queue_events_at ON queue_events (at);
    """,
    # 7: the process uploading a finished video (one at a time, even two serves in a race) and how many uploads were
    # started, so that an upload whose answer was lost is looked for before it is sent again.
    """
    ALTER TABLE jobs ADD COLUMN delivery_holder TEXT;
    ALTER TABLE jobs ADD COLUMN delivery_claimed_at REAL;
    ALTER TABLE jobs ADD COLUMN upload_starts INTEGER NOT NULL DEFAULT 0;
    """,
    # 8: a user's first waiting job for a model in one seek (the warm worker's choice, engine/queue/order.py), where
    # jobs_queued_per_user reads every waiting job of a user who has none for it.
    """
    CREATE INDEX jobs_queued_per_user_model ON jobs (user_key, model, priority DESC, id) WHERE status = 'queued';
    """,
]


WORKERS_TABLE = 6  # the first schema with the workers' heartbeats


class SqliteTx:
    for_update = ""
    skip_locked = ""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def one(self, sql: str, *args: Any) -> Row | None:
        return await (await self._db.execute(sql, args)).fetchone()

    async def all(self, sql: str, *args: Any) -> list[Row]:
        return list(await (await self._db.execute(sql, args)).fetchall())

    async def run(self, sql: str, *args: Any) -> int:
        return (await self._db.execute(sql, args)).rowcount

    async def run_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        await self._db.executemany(sql, rows)

    async def serialize(self, name: str) -> None:
        """Nothing to do: a write transaction here already excludes every other."""

    async def notify(self, channel: str) -> None:
        """Nothing to do: processes sharing a SQLite file poll for new events."""


class SqliteBackend:
    """One aiosqlite connection; its statements run one transaction (or read) at a time."""

    # Processes sharing the file learn of each other's events by polling (a read of an index, a few times a second).
    event_poll_s = 0.1

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.path: Path | None = path
        self._identity = _file_identity(path)

    @classmethod
    async def open(cls, path: Path, busy_timeout_s: float = 10.0) -> SqliteBackend:
        """Open (creating or migrating) the file at `path`; a damaged file is a UserError that names it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            await db.execute("PRAGMA foreign_keys=ON")
            check = await (await db.execute("PRAGMA quick_check(1)")).fetchone()
            if check[0] != "ok":
                raise sqlite3.DatabaseError(check[0])
            backend = cls(db, path)
            await backend._migrate()
        except UserError:
            await db.close()
            raise
        except sqlite3.DatabaseError as exc:
            await db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise UserError(
                f"The job database {path} cannot be used: {exc}.",
                "Stop wanbot, restore the file from a backup (wanbot backup) or move it aside to start with an empty "
                "queue, then start it again.",
            ) from exc
        return backend

    async def close(self) -> None:
        await self._db.close()

    def file_is_gone(self) -> bool:
        """True once the database file was deleted or replaced under us: writes would go to a file nobody sees."""
        return self.path is not None and _file_identity(self.path) != self._identity

    async def backup(self, target: Path) -> None:
        """A consistent copy of the live database (SQLite's online backup), written aside and renamed into place."""
        temp = target.with_name(f".{target.name}.part")
        temp.unlink(missing_ok=True)
        async with self._lock:
            copy = await aiosqlite.connect(temp)
            try:
                await self._db.backup(copy)
            finally:
                await copy.close()
        temp.replace(target)

    async def _migrate(self) -> None:
        async with self.transaction():
            version = (await (await self._db.execute("PRAGMA user_version")).fetchone())[0]
            check_schema(version, len(MIGRATIONS), str(self.path))
            if WORKERS_TABLE <= version < len(MIGRATIONS):
                workers = await self._db.execute_fetchall("SELECT * FROM workers WHERE state != 'stopped'")
                flag = await (await self._db.execute("SELECT value FROM queue_flags WHERE name = 'serving'")).fetchone()
                running = still_running(workers, flag[0] if flag else None, time.time())
                check_upgrade_alone(version, len(MIGRATIONS), str(self.path), running)
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in split_sql(script):
                    await self._db.execute(statement)
                await self._db.execute(f"PRAGMA user_version={number}")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """One IMMEDIATE transaction at a time on this connection; rolled back on any error."""
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTx(self._db)
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[SqliteTx]:
        async with self._lock:
            yield SqliteTx(self._db)

    @asynccontextmanager
    async def listen(self, channel: str, wake: Callable[[], None]) -> AsyncIterator[Callable[[], bool]]:
        """SQLite has no notifications: the follower polls every `event_poll_s` instead."""
        yield lambda: True


def split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (which contain ';') whole."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        if joined.endswith(";") and (
            not joined.upper().startswith("CREATE TRIGGER") or joined.upper().endswith("END;")
        ):
            statements.append(joined)
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current).strip())
    return statements


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino
