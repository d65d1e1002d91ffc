"""Scratch schemas on a shared PostgreSQL server, for the tests and the benchmarks (never for wanbot itself)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg


@asynccontextmanager
async def temporary_schema(server_url: str) -> AsyncIterator[str]:
    """A URL whose queue lives in a new, empty schema of its own, dropped with everything in it at the end: for tests
    and benchmarks on a shared server."""
    schema = f"wanbot_scratch_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        try:
            separator = "&" if "?" in server_url else "?"
            # asyncpg passes query parameters it does not know on to the server as settings.
            yield f"{server_url}{separator}search_path={schema}"
        finally:
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()
