"""What the job queue needs of a database, so one body of SQL serves SQLite and PostgreSQL.

The queue's SQL is written once, with `?` placeholders and SQLite's `INDEXED BY` hints; the PostgreSQL backend
numbers the placeholders and drops the hints (its planner has statistics). Where the two must differ, a Tx says how:
`for_update` and `skip_locked` are empty on SQLite, where a write transaction (BEGIN IMMEDIATE) already excludes
every other writer, and row locks on PostgreSQL, where several processes write at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from engine.errors import UserError
from engine.queue.processes import HEARD_RECENTLY_S, Heard

Row = Mapping[str, Any]


class Tx(Protocol):
    """One transaction (or, from `Backend.reading`, one connection that only reads)."""

    # Appended to a SELECT of a row the transaction is about to change: nobody changes it in between.
    for_update: str
    # Appended to a SELECT that picks a row to claim: rows another process is claiming right now are passed by.
    skip_locked: str

    async def one(self, sql: str, *args: Any) -> Row | None: ...

    async def all(self, sql: str, *args: Any) -> list[Row]: ...

    async def run(self, sql: str, *args: Any) -> int:
        """Execute a statement; the number of rows it changed."""
        ...

    async def run_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None: ...

    async def serialize(self, name: str) -> None:
        """Let one transaction that calls this with `name` run at a time, until it ends (counts then inserts)."""
        ...

    async def notify(self, channel: str) -> None:
        """Tell listening processes, once this transaction commits, that `channel` has news (PostgreSQL)."""
        ...


class Backend(Protocol):
    path: Path | None  # the database file, where there is one
    event_poll_s: float  # how often a process looks for events of others (beside notifications, where there are)

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A write transaction, committed at the end of the block and rolled back on any error."""
        ...

    def reading(self) -> AbstractAsyncContextManager[Tx]: ...

    def listen(self, channel: str, wake: Callable[[], None]) -> AbstractAsyncContextManager[Callable[[], bool]]:
        """Call `wake` whenever another process notifies `channel`; yields a check that it still listens."""
        ...

    async def close(self) -> None: ...

    async def backup(self, target: Path) -> None: ...

    def file_is_gone(self) -> bool: ...


def check_schema(version: int, known: int, where: str) -> None:
    """A database migrated by a newer wanbot than this one: this one would misread its tables, so it refuses."""
    if version > known:
        raise UserError(
            f"The job database {where} was made by a newer wanbot (schema {version}; this wanbot knows up to "
            f"{known}), so this one does not start.",
            "Run the newer wanbot, or restore the backup taken before the upgrade (README: Upgrading).",
        )


def check_upgrade_alone(version: int, known: int, where: str, running: list[Heard]) -> None:
    """A migration under processes of the older wanbot would change the tables they read and write: it waits
    until they have stopped."""
    if version < known and running:
        names = "; ".join(f"{process.what} (pid {process.pid} on {process.host})" for process in running[:4])
        more = f" and {len(running) - 4} more" if len(running) > 4 else ""
        raise UserError(
            f"Not started: this wanbot would upgrade the job database {where} (schema {version} to {known}), but "
            f"other wanbot processes still use it: {names}{more}.",
            "Stop every wanbot process on this database first, back it up, then start the new wanbot (README: "
            f"Upgrading). A process killed without stopping counts as gone {HEARD_RECENTLY_S:.0f} s after it was "
            "last heard from.",
        )
