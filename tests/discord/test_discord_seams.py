"""bot/discord/seams.py is wanbot's only reach into discord.py's private API. These tests name each seam, so an
upgrade of discord.py that moves one fails here, loudly, rather than somewhere deep in an adapter test."""

from __future__ import annotations

from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.discord import seams


def test_the_rest_base_and_the_gateway_are_where_discord_py_reads_them(monkeypatch: pytest.MonkeyPatch):
    assert isinstance(Route.BASE, str), "discord.py moved Route.BASE: bot/discord/seams.py:point_at needs a new way"
    assert isinstance(DiscordWebSocket.DEFAULT_GATEWAY, yarl.URL), "discord.py moved DiscordWebSocket.DEFAULT_GATEWAY"
    monkeypatch.setattr(Route, "BASE", Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    seams.point_at("http://127.0.0.1:9/api/v10/", "ws://127.0.0.1:9/gateway")
    assert Route("GET", "/users/@me").url == "http://127.0.0.1:9/api/v10/users/@me"
    assert yarl.URL("ws://127.0.0.1:9/gateway") == DiscordWebSocket.DEFAULT_GATEWAY


def test_unset_urls_leave_discords_own(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Route, "BASE", "https://discord.com/api/v10")
    seams.point_at(None, None)
    assert Route("GET", "/gateway").url == "https://discord.com/api/v10/gateway"


def test_interaction_payloads_are_seen_before_discord_py_parses_them():
    client = discord.Client(intents=discord.Intents.none())
    parsers = seams.connection_state(client).parsers
    assert callable(parsers.get(seams.INTERACTION_EVENT)), "discord.py no longer parses INTERACTION_CREATE there"
    order: list[str] = []
    parsers[seams.INTERACTION_EVENT] = lambda data: order.append(f"parsed {data['id']}")
    seen: list[dict[str, Any]] = []
    seams.watch_interactions(client, lambda data: (seen.append(data), order.append(f"kept {data['id']}")))
    parsers[seams.INTERACTION_EVENT]({"id": "7"})
    assert seen == [{"id": "7"}]
    assert order == ["kept 7", "parsed 7"]


def test_an_attachment_is_rebuilt_from_its_payload_and_the_connection_state():
    client = discord.Client(intents=discord.Intents.none())
    payload = {"id": "5", "filename": "a.png", "size": 3, "url": "http://127.0.0.1:9/a.png", "proxy_url": ""}
    attachment = discord.Attachment(data=payload, state=seams.connection_state(client))
    assert (attachment.id, attachment.filename, attachment.size) == (5, "a.png", 3)
    assert attachment.to_dict()["url"] == payload["url"]
