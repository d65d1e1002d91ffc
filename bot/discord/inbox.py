"""Deferred Discord requests that survive a crash: stored before the interaction is acknowledged, kept until queued.

Acknowledging (deferring) an interaction is Discord's "got it": a process that dies after that and before the job is
queued would leave the user with "thinking…" for good. So each request is stored first, with the interaction's raw
gateway payload (taken as discord.py parses it), and at the next start every request not finished is rebuilt as the
same real discord.py objects and submitted again; its deferred answer is edited as if nothing had happened while the
interaction token lives, and the job's messages go to the channel after that.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import discord

from bot.chat.inbox import ChatInbox
from bot.discord import seams
from engine.pipeline.models import GenerationRequest
from engine.service import Engine

log = logging.getLogger(__name__)

PLATFORM = "discord"
RECENT_PAYLOADS = 256  # interactions whose payload is kept until their command handler stores them


@dataclass
class PendingRequest:
    interaction: discord.Interaction
    request: GenerationRequest
    start: discord.Attachment | None
    end: discord.Attachment | None
    notes: list[str]
    received_at: float


class InteractionInbox:
    def __init__(self, client: discord.Client, engine: Engine) -> None:
        self._client = client
        self._inbox = ChatInbox(engine.database, PLATFORM)
        self._payloads: OrderedDict[int, dict[str, Any]] = OrderedDict()
        seams.watch_interactions(client, self._keep_payload)

    def _keep_payload(self, data: dict[str, Any]) -> None:
        self._payloads[int(data["id"])] = data
        while len(self._payloads) > RECENT_PAYLOADS:
            self._payloads.popitem(last=False)

    async def remember(self, pending: PendingRequest) -> None:
        """Store the request before the interaction is deferred."""
        interaction = pending.interaction
        payload = self._payloads.pop(interaction.id, None)
        if payload is None:  # not from the gateway (cannot happen in a running bot): nothing to rebuild it from
            log.warning("no payload for interaction=%s; it is not kept across a restart", interaction.id)
            return
        stored = {
            "interaction": payload,
            "request": pending.request.model_dump(mode="json"),
            "start": pending.start.to_dict() if pending.start is not None else None,
            "end": pending.end.to_dict() if pending.end is not None else None,
            "notes": pending.notes,
            "received_at": pending.received_at,
        }
        await self._inbox.put(str(interaction.id), json.dumps(stored))

    async def done(self, interaction: discord.Interaction) -> None:
        await self._inbox.done(str(interaction.id))

    async def unfinished(self) -> list[PendingRequest]:
        """The requests a stopped process had acknowledged but not finished, as real discord.py objects again."""
        state = seams.connection_state(self._client)
        pending = []
        for payload in await self._inbox.unfinished():
            stored = json.loads(payload)
            pending.append(
                PendingRequest(
                    interaction=discord.Interaction(data=stored["interaction"], state=state),
                    request=GenerationRequest.model_validate(stored["request"]),
                    start=_attachment(stored["start"], state),
                    end=_attachment(stored["end"], state),
                    notes=stored["notes"],
                    received_at=stored["received_at"],
                )
            )
        return pending


def _attachment(data: dict[str, Any] | None, state: Any) -> discord.Attachment | None:
    return discord.Attachment(data=data, state=state) if data is not None else None
