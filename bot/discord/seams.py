"""The one place wanbot reaches into discord.py beyond its public API, each reach with its reason.
tests/discord/test_discord_seams.py fails loudly, naming the seam, when an upgrade of discord.py moves one of them.

- The REST base and the gateway URL (`discord.api_base_url`, `discord.gateway_url`, used by tests and by operators
  behind a proxy) are class attributes in discord.py (`Route.BASE`, `DiscordWebSocket.DEFAULT_GATEWAY`): they apply to
  every client of the process, since discord.py has no per-client setting for either. Webhook follow-ups build their
  URLs from `Route.BASE` as well, so a per-client HTTP client would not be enough. wanbot runs one Discord client a
  process, so process-wide is what it needs.
- A deferred interaction is stored before it is acknowledged and rebuilt after a restart as a real
  `discord.Interaction`; that needs the raw gateway payload (kept by wrapping the client's INTERACTION_CREATE parser)
  and the client's connection state to build the objects from. discord.py offers neither publicly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

INTERACTION_EVENT = "INTERACTION_CREATE"


def point_at(api_base_url: str | None, gateway_url: str | None) -> None:
    """Send this process's Discord REST calls and its gateway connection to these URLs (None: Discord's own)."""
    if api_base_url:
        Route.BASE = api_base_url.rstrip("/")
    if gateway_url:
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def connection_state(client: discord.Client) -> Any:
    """The client's connection state, which discord.py's models are built from."""
    return client._connection


def watch_interactions(client: discord.Client, keep: Callable[[dict[str, Any]], None]) -> None:
    """Call `keep` with each INTERACTION_CREATE payload as the gateway delivers it, before discord.py handles it."""
    parsers = connection_state(client).parsers
    parse = parsers[INTERACTION_EVENT]

    def keep_then_parse(data: dict[str, Any]) -> None:
        keep(data)
        parse(data)

    parsers[INTERACTION_EVENT] = keep_then_parse
