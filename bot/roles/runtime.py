"""`wanbot run`, `wanbot serve` and `wanbot worker`: the chat adapters that have a token and/or one GPU worker, each
long-lived task supervised, until a signal (exit 0, the running job re-queued) or a task that cannot be kept alive
(exit 1, said in one line)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from enum import StrEnum
from functools import partial
from typing import Any

from engine.config import Settings
from engine.errors import UserError
from engine.service import Engine

log = logging.getLogger(__name__)

WORKER_TASK = "worker"
CLEAN_UP_EVERY_S = 3600.0
DATABASE_CHECK_EVERY_S = 5.0


class Role(StrEnum):
    """What a process does: `run` is both of the others in one process."""

    RUN = "run"
    SERVE = "serve"  # the chat adapters, delivery, clean-up; no model, no torch
    WORKER = "worker"  # one GPU worker and nothing else


async def serve(settings: Settings, say: Callable[[str], None], role: Role = Role.RUN) -> str | None:
    """Run until a signal (None) or until a long-lived task could not be kept alive (what failed). `say` prints the
    lines an operator reads at start-up."""
    # First of all: a signal while torch and the model code load (seconds) still ends the process cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, partial(_stop_on_signal, signal.Signals(signum), stop))
    makes_videos = role is not Role.SERVE
    engine = await Engine.open(settings, with_worker=makes_videos)
    supervisor = engine.supervisor
    adapters: list[Any] = []
    try:
        with worker_lock(settings) if makes_videos else contextlib.nullcontext(True) as own_worker:
            if not own_worker:
                raise UserError(
                    f"Another wanbot process is already running a worker for {settings.generation.device} on this "
                    "data folder.",
                    "Stop it first, give this one another device (wanbot worker --device cuda:N), or another "
                    "WANBOT_DATA_DIR.",
                )
            engine.check_metrics_port()
            # Always: a `wanbot worker` may share even a `wanbot run`'s SQLite file (a second GPU on one machine).
            engine.share_events()
            supervisor.start("shared events", engine.follow_events)
            await engine.recover()
            if role is not Role.WORKER:  # a worker queues nothing: the enhancer runs where requests arrive
                await engine.load_enhancer()  # a local model is ready before the first request waits on it
            await engine.load_rules()  # the picture classifier too, before the first picture
            if role is not Role.WORKER and _has_chat(settings):
                await _take_the_chats(engine)
            if role is not Role.WORKER:
                await _start_adapters(engine, adapters)
            if makes_videos:
                supervisor.start(WORKER_TASK, engine.run_worker)
            else:
                supervisor.start("recovery", engine.recover_periodically)
            supervisor.start("clean-up", partial(_clean_up_periodically, engine))
            supervisor.start("database watch", partial(_watch_database, engine))
            if settings.metrics.port is not None:
                # A port that is taken is the operator's to fix: said once, not retried.
                supervisor.start("metrics", engine.serve_metrics, restart=False)
            say(_started_line(settings, role, adapters))
            if engine.enhancer_line is not None and role is not Role.WORKER:
                say(engine.enhancer_line)
            if engine.rules_line is not None:
                say(engine.rules_line)
            if makes_videos:
                say(f"videos are made on {engine.device_text()}")
                await engine.say_plans(say)
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


def _stop_on_signal(received: signal.Signals, stop: asyncio.Event) -> None:
    # The operator's record of why the process ended, before the lines of what stopping does.
    log.info("received %s: stopping; a running job goes back to the queue, first in line", received.name)
    stop.set()


def _started_line(settings: Settings, role: Role, adapters: list[Any]) -> str:
    where = settings.data_dir if settings.database.url is None else settings.database_shown
    if role is Role.SERVE:
        chats = ", ".join(type(adapter).__name__ for adapter in adapters) or "no chat (no token set)"
        return f"wanbot serving {chats} on {where}; videos are made by `wanbot worker` processes; Ctrl+C stops"
    if role is Role.WORKER:
        return f"wanbot worker on {where} ({settings.generation.device}); Ctrl+C stops, the running job is re-queued"
    return f"wanbot running on {where} {_serving(adapters)}; Ctrl+C stops, the running job is re-queued"


@contextlib.contextmanager
def worker_lock(settings: Settings) -> Iterator[bool]:
    """True if this process may run the worker of its device; False when another wanbot process already does."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    device = settings.generation.device
    name = "worker.lock" if device == "auto" else f"worker-{device.replace(':', '')}.lock"
    with (settings.data_dir / name).open("w") as handle:
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


def _has_chat(settings: Settings) -> bool:
    return settings.telegram.token is not None or settings.discord.token is not None


async def _take_the_chats(engine: Engine) -> None:
    """One process serves a database's chats: a second would acknowledge every request and upload every video again."""
    other = await engine.take_serving()
    if other is not None:
        lease_s = engine.settings.queue.lease_s
        raise UserError(
            f"Not started: {other}.",
            f"Stop that one first (an upgrade: stop, then start). If it was killed on another machine, this one can "
            f"start once its lease of {lease_s:.0f} s has run out.",
        )
    engine.supervisor.start("serving lease", engine.keep_serving)


async def _start_adapters(engine: Engine, started: list[Any]) -> None:
    """Start the adapters that have a token, adding each to `started` once it runs."""
    if engine.settings.telegram.token is not None:
        from bot.telegram.adapter import TelegramAdapter

        telegram = TelegramAdapter(engine, engine.settings.telegram)
        await telegram.start()
        started.append(telegram)
    if engine.settings.discord.token is not None:
        from bot.discord.adapter import DiscordAdapter

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
