"""Keeps bot tokens out of log output: httpx and the chat libraries log request URLs, which can contain them."""

from __future__ import annotations

import logging


class TokenRedactor(logging.Filter):
    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._token in message:
            record.msg, record.args = message.replace(self._token, "<token>"), ()
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
