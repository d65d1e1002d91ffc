"""`wanbot run`: the worker and the chat adapters that have a token in one process, each long-lived task supervised,
until a signal (exit 0, the running job re-queued) or a task that cannot be kept alive (exit 1, said in one line)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from functools import partial
from typing import Any

from engine.config import Settings
from engine.errors import UserError
from engine.service import Engine

log = logging.getLogger(__name__)

WORKER_TASK = "worker"
CLEAN_UP_EVERY_S = 3600.0
DATABASE_CHECK_EVERY_S = 5.0


async def serve(settings: Settings, say: Callable[[str], None]) -> str | None:
    """Run until a signal (None) or until a long-lived task could not be kept alive (what failed). `say` prints the
    lines an operator reads at start-up."""
    engine = await Engine.open(settings)
    supervisor = engine.supervisor
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    adapters: list[Any] = []
    try:
        with worker_lock(settings) as own_worker:
            if not own_worker:
                raise UserError(
                    "Another wanbot process is already running the worker on this data folder.",
                    "Stop it first, or give this one another WANBOT_DATA_DIR.",
                )
            await engine.recover()
            await _start_adapters(engine, adapters)
            supervisor.start(WORKER_TASK, engine.run_worker)
            supervisor.start("clean-up", partial(_clean_up_periodically, engine))
            supervisor.start("database watch", partial(_watch_database, engine))
            serving = _serving(adapters)
            say(f"wanbot running on {settings.data_dir} {serving}; Ctrl+C stops, the running job is re-queued")
            say(f"videos are made on {engine.device_text()}")
            await engine.say_missing_models(say)
            await _first_of(stop.wait(), supervisor.wait_failed())
            await engine.stop_worker()
            await supervisor.join(WORKER_TASK)
    finally:
        # Also when an adapter fails to start: the ones already running stop, and the process can exit.
        for adapter in adapters:
            await adapter.stop()
        await engine.close()
    return supervisor.failure


@contextlib.contextmanager
def worker_lock(settings: Settings) -> Iterator[bool]:
    """True if this process may run the worker; False when another wanbot process already does."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with (settings.data_dir / "worker.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _serving(adapters: list[Any]) -> str:
    """What this process serves: without a token it is a worker only, which an operator should hear at once."""
    if not adapters:
        return "as a worker only (no chat token set: TELEGRAM_BOT_TOKEN or DISCORD_BOT_TOKEN adds a chat)"
    return "with " + ", ".join(type(adapter).__name__ for adapter in adapters)


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


async def _start_adapters(engine: Engine, started: list[Any]) -> None:
    """Start the adapters that have a token, adding each to `started` once it runs."""
    if engine.settings.telegram.token is not None:
        from bot.telegram_adapter import TelegramAdapter

        telegram = TelegramAdapter(engine, engine.settings.telegram)
        await telegram.start()
        started.append(telegram)
    if engine.settings.discord.token is not None:
        from bot.discord_adapter import DiscordAdapter

        discord_adapter = DiscordAdapter(engine, engine.settings.discord)
        await discord_adapter.start()
        started.append(discord_adapter)


async def _watch_database(engine: Engine, every_s: float = DATABASE_CHECK_EVERY_S) -> None:
    """A database file deleted or replaced under a running bot takes every later request with it: stop instead."""
    while True:
        await asyncio.sleep(every_s)
        reason = engine.database_gone()
        if reason is not None:
            engine.supervisor.fail(reason)
            return


async def _clean_up_periodically(engine: Engine, every_s: float = CLEAN_UP_EVERY_S) -> None:
    while True:
        try:
            images, videos = await engine.clean_up()
            if images or videos:
                log.info("removed %d unused images and %d video files", images, videos)
        except Exception:
            # A full disk or a locked file must not end the clean-up for good: the next round tries again.
            log.warning("clean-up failed; next try in %.0f s", every_s, exc_info=True)
        await asyncio.sleep(every_s)
