"""Keeps bot tokens out of log output: httpx and the chat libraries log request URLs, which can contain them."""

from __future__ import annotations

import logging
import re

# Discord interaction tokens let anyone post as the bot in that channel for 15 minutes. At DEBUG they appear in
# webhook and callback URLs (discord.py), in gateway payloads (discord.py) and in SQL parameters (aiosqlite).
INTERACTION_TOKENS = (
    re.compile(r"\b((?:webhooks|interactions)/\d+/)[^/\s?'\"]+"),
    re.compile(r"""(["'](?:interaction_)?token["']\s*:\s*["'])[^"']+"""),
)


class TokenRedactor(logging.Filter):
    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message.replace(self._token, "<token>")
        for pattern in INTERACTION_TOKENS:
            redacted = pattern.sub(r"\1<token>", redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def redact_everywhere(token: str) -> TokenRedactor:
    """Install a redactor on every root handler (each record passes them), and quiet httpx's per-request lines."""
    redactor = TokenRedactor(token)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return redactor


def remove_redactor(redactor: TokenRedactor) -> None:
    for handler in logging.getLogger().handlers:
        handler.removeFilter(redactor)
