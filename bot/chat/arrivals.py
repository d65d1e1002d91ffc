"""The order in which a chat's messages arrived. Messages sent at once are handled at once (downloads and checks
overlap), but each request is queued only after the chat's earlier messages have been handled, so job numbers and
places follow the order people wrote in."""

from __future__ import annotations

import asyncio


class ArrivalOrder:
    """Messages being handled, per chat, in the order they arrived. A message never registered (a platform that
    does not register, a request made by a button) waits for nothing."""

    def __init__(self) -> None:
        self._open: dict[str, dict[str, asyncio.Event]] = {}  # chat -> message -> set once handled; dicts keep order

    def arrived(self, chat_id: str, message_id: str) -> None:
        self._open.setdefault(chat_id, {})[message_id] = asyncio.Event()

    def handled(self, chat_id: str, message_id: str) -> None:
        messages = self._open.get(chat_id, {})
        event = messages.pop(message_id, None)
        if event is not None:
            event.set()
        if not messages:
            self._open.pop(chat_id, None)  # nothing kept for a chat once its messages are handled

    async def turn(self, chat_id: str, message_id: str) -> None:
        """Wait until every message of the chat that arrived before this one has been handled."""
        messages = self._open.get(chat_id, {})
        if message_id not in messages:
            return
        earlier = []
        for other, event in messages.items():
            if other == message_id:
                break
            earlier.append(event)
        for event in earlier:
            await event.wait()
