"""Flags that outlive the process and are the same for every process: the pause, and a chat's choices."""

from __future__ import annotations

from engine.queue.core import (
    QueueCore,
)


class Flags(QueueCore):
    async def set_paused(self, paused: bool) -> None:
        await self.set_flag("paused", "1" if paused else "0")

    async def is_paused(self) -> bool:
        return await self.flag("paused") == "1"

    async def set_flag(self, name: str, value: str) -> None:
        """A setting that outlives the process and is the same for every process (a pause, a chat's choices)."""
        async with self._transaction() as db:
            await db.run(
                "INSERT INTO queue_flags (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                name,
                value,
            )

    async def flag(self, name: str) -> str | None:
        row = await self._read_one("SELECT value FROM queue_flags WHERE name = ?", name)
        return row["value"] if row else None
