"""What the chat adapter tests share: the bot running as `wanbot run` starts it, and waiting on a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from engine.config import Settings
from engine.service import Engine


class Adapter(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class RunningBot:
    """Engine, worker and one chat adapter together, as `wanbot run` starts them."""

    def __init__(self, settings: Settings, make_adapter: Callable[[Engine], Adapter]) -> None:
        self.settings = settings
        self._make_adapter = make_adapter

    async def __aenter__(self) -> RunningBot:
        self.engine = await Engine.open(self.settings)
        await self.engine._worker.start_up()
        self.adapter = self._make_adapter(self.engine)
        try:
            await self.adapter.start()
        except BaseException:
            await self.engine.close()  # its database thread would otherwise keep the test process alive
            raise
        self.worker = asyncio.create_task(self.engine._worker.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine._worker.stop(requeue_running=True)
        await self.worker
        await self.adapter.stop()
        await self.engine.close()


async def until(condition: Callable[[], Any], limit_s: float = 60, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + limit_s
    while asyncio.get_running_loop().time() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
