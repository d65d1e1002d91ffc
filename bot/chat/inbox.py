"""The chats' inbox: every chat request is stored before its platform learns that it arrived, and marked done once
it is handled, so a process that stops in between handles it again (once) at its next start.

It is the chat side's own table in the queue's database (`Engine.database`), so a request and the job it becomes
live and are backed up together; the queue's migrations create the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.service import Database

# Handled requests are kept this long, so a platform that sends one again is not answered twice.
INBOX_KEEP_S = 86400.0


class ChatInbox:
    """One platform's requests: `put` before acknowledging, `done` once handled, `unfinished` at start."""

    def __init__(self, database: Database, platform: str, clock: Callable[[], float] = time.time) -> None:
        self._db = database
        self._platform = platform
        self._clock = clock

    async def put(self, key: str, payload: str, message_key: str | None = None) -> bool:
        """Store a request before the platform learns it arrived; False if it was stored before (sent again)."""
        async with self._db.transaction() as db:
            added = await db.run(
                """INSERT INTO chat_inbox (platform, key, message_key, payload, received_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (platform, key) DO NOTHING""",
                self._platform,
                key,
                message_key,
                payload,
                self._clock(),
            )
            return added == 1

    async def unfinished(self) -> list[str]:
        """Payloads of the requests not handled to the end (the process stopped first), oldest first; handled ones
        older than INBOX_KEEP_S are forgotten meanwhile."""
        async with self._db.transaction() as db:
            await db.run(
                "DELETE FROM chat_inbox WHERE platform = ? AND done_at < ?",
                self._platform,
                self._clock() - INBOX_KEEP_S,
            )
            rows = await db.all(
                """SELECT payload FROM chat_inbox INDEXED BY chat_inbox_open
                   WHERE platform = ? AND done_at IS NULL ORDER BY received_at""",
                self._platform,
            )
        return [row["payload"] for row in rows]

    async def done(self, *keys: str) -> None:
        async with self._db.transaction() as db:
            await db.run_many(
                "UPDATE chat_inbox SET done_at = ? WHERE platform = ? AND key = ?",
                [(self._clock(), self._platform, key) for key in keys],
            )

    async def set_reply(self, message_key: str, reply: str) -> None:
        """What was already answered to a message (the "Checking" message), so that handling it again edits that."""
        async with self._db.transaction() as db:
            await db.run(
                "UPDATE chat_inbox SET reply = ? WHERE platform = ? AND message_key = ?",
                reply,
                self._platform,
                message_key,
            )

    async def reply(self, message_key: str) -> str | None:
        async with self._db.reading() as db:
            row = await db.one(
                "SELECT reply FROM chat_inbox WHERE platform = ? AND message_key = ? AND reply IS NOT NULL",
                self._platform,
                message_key,
            )
        return row["reply"] if row else None
