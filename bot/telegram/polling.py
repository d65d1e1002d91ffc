"""Telegram long polling that loses no request: each update is stored before Telegram is told it arrived.

Telegram forgets an update once a getUpdates call asks for a later offset, and python-telegram-bot's Updater makes
that call at once, while the handler of the update may still be downloading a picture: a crash then loses the
request. Here the updates of one answer are stored first, then handed to the Application; the next call confirms
them. An update stays open in the store until its handler has finished, so at start-up everything a stopped process
had not finished is handled again (the handlers are idempotent: a job is found by its message, and the "Checking"
message already sent is reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Sequence

from telegram import Bot, Update
from telegram.error import NetworkError, RetryAfter

from bot.chat.arrivals import ArrivalOrder
from bot.chat.inbox import ChatInbox
from engine.service import Engine

log = logging.getLogger(__name__)

PLATFORM = "telegram"
TASK = "telegram polling"
MAX_WAIT_S = 30.0


def message_key(chat_id: int, message_id: int) -> str:
    return f"{chat_id}:{message_id}"


class DurablePolling:
    def __init__(
        self,
        bot: Bot,
        engine: Engine,
        process: Callable[[Update], Awaitable[None]],
        timeout_s: float,
        allowed_updates: Sequence[str],
        arrivals: ArrivalOrder,
        inbox: ChatInbox,
    ) -> None:
        """`arrivals` learns of each message as it is handed on, in the order Telegram sent them, and when it has
        been handled."""
        self._bot = bot
        self._supervisor = engine.supervisor
        self._process = process
        self._timeout_s = timeout_s
        self._allowed = list(allowed_updates)
        self._offset: int | None = None
        self._handling: set[asyncio.Task[None]] = set()
        self._deferred: set[int] = set()
        self._arrivals = arrivals
        self._inbox = inbox

    async def start(self) -> None:
        await self._bot.delete_webhook()
        for payload in await self._inbox.unfinished():
            update = Update.de_json(json.loads(payload), self._bot)
            log.info("handling again update=%s, which the last run had not finished", update.update_id)
            self._hand_on(update)
        self._supervisor.start(TASK, self._poll)

    async def stop(self) -> None:
        """Stop polling; updates being handled stay open and are handled again at the next start."""
        await self._supervisor.cancel(TASK)
        for task in list(self._handling):
            task.cancel()
        for task in list(self._handling):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def defer(self, update_id: int) -> None:
        """The handler keeps the update open past its own end (a photo of an album waits for the others)."""
        self._deferred.add(update_id)

    async def done(self, *update_ids: int) -> None:
        self._deferred.difference_update(update_ids)
        await self._inbox.done(*(str(update_id) for update_id in update_ids))

    async def _poll(self) -> None:
        wait_s = 1.0
        while True:
            try:
                updates = await self._bot.get_updates(
                    offset=self._offset, timeout=int(self._timeout_s), allowed_updates=self._allowed
                )
            except RetryAfter as limit:
                await asyncio.sleep(seconds(limit.retry_after))
                continue
            except NetworkError as error:
                # An outage of Telegram or of the network: wait it out, as long as it lasts.
                log.warning("getUpdates failed (%s); trying again in %.0f s", error, wait_s)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, MAX_WAIT_S)
                continue
            wait_s = 1.0
            for update in updates:
                stored = await self._inbox.put(
                    str(update.update_id), json.dumps(update.to_dict()), _message_key_of(update)
                )
                if stored:  # else the last run stored it, and its start handled it again
                    self._hand_on(update)
            if updates:
                self._offset = updates[-1].update_id + 1

    def _hand_on(self, update: Update) -> None:
        if update.message is not None:
            self._arrivals.arrived(str(update.message.chat_id), str(update.message.message_id))
        task = asyncio.create_task(self._handle(update))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _handle(self, update: Update) -> None:
        try:
            await self._process(update)
        except Exception:
            log.exception("update=%s could not be handled", update.update_id)
        finally:
            # Also when stopped: the chat's later messages must not wait for it. A deferred one (an album's picture)
            # is handled when whoever deferred it says so.
            if update.message is not None and update.update_id not in self._deferred:
                self._arrivals.handled(str(update.message.chat_id), str(update.message.message_id))
        if update.update_id not in self._deferred:
            try:
                await self.done(update.update_id)
            except Exception:
                # Only means it is handled once more (harmlessly) after the next start.
                log.warning("could not mark update=%s handled", update.update_id, exc_info=True)


def _message_key_of(update: Update) -> str | None:
    message = update.message
    return message_key(message.chat_id, message.message_id) if message is not None else None


def seconds(value: int | dt.timedelta) -> float:
    """A retry_after, which python-telegram-bot gives as seconds or (opted in) as a timedelta."""
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
