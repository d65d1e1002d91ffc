"""A job's state as a reaction on the request message: a silent status beside the live message, for people who
scroll past it. Set where the chat allows it; a chat that refuses reactions is left alone from then on, and a
failed reaction never gets in the way of the job's messages."""

from __future__ import annotations

import logging

from telegram import Bot
from telegram.error import BadRequest, TelegramError

from engine.jobs import DeliveryStatus, Job, JobStatus

log = logging.getLogger(__name__)
WAITING, MAKING, SENT, FAILED, CANCELLED, WITHHELD = "👀", "✍", "🎉", "😢", "🤷", "🙈"


def reaction_for(job: Job) -> str:
    """The reaction for a job's state: waiting, being made (or sent), sent, failed, cancelled, or kept back."""
    if job.status is JobStatus.QUEUED:
        return WAITING
    if job.status is JobStatus.FAILED:
        return FAILED
    if job.status is JobStatus.CANCELLED:
        return CANCELLED
    if job.status is JobStatus.SUCCEEDED and job.delivery_status is DeliveryStatus.DELIVERED:
        return SENT
    if job.status is JobStatus.SUCCEEDED and job.delivery_status is DeliveryStatus.DELIVERY_FAILED:
        return WITHHELD if job.result is not None and job.result.flagged is not None else FAILED
    return MAKING


class Reactions:
    def __init__(self, bot: Bot, enabled: bool) -> None:
        self._bot = bot
        self._enabled = enabled
        self._shown: dict[int, str] = {}  # job id -> the reaction its request shows
        self._refusing: set[int] = set()  # chats that allow no reactions (or not these)

    async def show(self, job: Job) -> None:
        """Put the reaction for `job`'s state on its request message, when it changed; never raises."""
        request_id = job.source.reply.get("request_message_id")
        chat_id = int(job.source.chat_id)
        reaction = reaction_for(job)
        if not self._enabled or not request_id or chat_id in self._refusing or self._shown.get(job.id) == reaction:
            return
        self._shown[job.id] = reaction
        if job.status.terminal and reaction in (SENT, FAILED, CANCELLED, WITHHELD):
            self._shown.pop(job.id)  # its last one: nothing to compare the next with
        try:
            await self._bot.set_message_reaction(chat_id, int(request_id), reaction)
        except BadRequest as error:
            # Reactions turned off in the chat, or this emoji not among its allowed ones: quietly none there.
            log.info("no reactions in chat=%s: %s", chat_id, error)
            self._refusing.add(chat_id)
        except TelegramError as error:
            log.info("reaction for job=%s not set: %s", job.id, error)
