"""Moving files between wanbot and a chat platform: how long an upload may take, what to send after a 413, and
picture downloads that survive a flaky file server. Each adapter says which of its library's errors are worth
another try; the waits and sizes live here once, as module constants tests can shrink."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from engine.errors import UserError
from engine.service import size_text

log = logging.getLogger(__name__)

# A platform answers an upload only after it has processed it, so a timeout shorter than sending plus processing
# sends the video twice. Sized for a slow uplink: a floor for processing, plus the file at 1 MB/s.
UPLOAD_TIMEOUT_FLOOR_S = 60.0
SLOW_LINK_BYTES_PER_S = 1_000_000
# After a 413 the next file is this fraction of the refused one, never the same file again.
SMALLER_AFTER_413 = 0.6
DOWNLOAD_TRIES = 3  # the first try and two retries, then the user gets the apology
DOWNLOAD_BACKOFF_S = 1.0  # wait before the first retry; it doubles
DOWNLOAD_TIMEOUT_FLOOR_S = 30.0


class IncompleteDownload(Exception):
    """The file server sent fewer (or more) bytes than the platform declared for the file."""


def upload_timeout_s(size_bytes: int, limit_bytes: int) -> float:
    """Seconds to allow one upload of `size_bytes`: its time over a slow link (at most the upload limit's) plus a
    floor for the platform's own processing."""
    return UPLOAD_TIMEOUT_FLOOR_S + min(size_bytes, limit_bytes) / SLOW_LINK_BYTES_PER_S


def limit_after_413(sent_bytes: int) -> int:
    """The upload limit for the next try after the platform refused a file of `sent_bytes` as too large."""
    return int(sent_bytes * SMALLER_AFTER_413)


async def read_capped(url: str, limit: int, what: str) -> bytes:
    """A file whose size nobody declared, read only up to `limit` bytes: a larger one is refused as soon as it is,
    before it fills the memory."""
    data = bytearray()
    async with httpx.AsyncClient(timeout=DOWNLOAD_TIMEOUT_FLOOR_S) as client, client.stream("GET", url) as response:
        response.raise_for_status()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limit:
                raise UserError(
                    f"{what.capitalize()} is larger than the {size_text(limit)} a bot may fetch.",
                    "Send a smaller or more compressed picture.",
                )
    return bytes(data)


def retryable_http_error(error: Exception) -> bool:
    """What `read_capped` may raise that can pass: a dropped connection or a 5xx."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


def check_size(data: bytes, declared: int | None) -> bytes:
    if declared is not None and len(data) != declared:
        raise IncompleteDownload(f"got {len(data)} bytes of a {declared}-byte file")
    return data


async def download(
    fetch: Callable[[], Awaitable[bytes]], retryable: Callable[[Exception], bool], size_hint: int, what: str
) -> bytes:
    """`fetch()`, tried again with doubling waits while it fails in a way that may pass: a stall (a try longer than
    `size_hint` bytes need over a slow link), an incomplete body, or an error `retryable` names. After
    DOWNLOAD_TRIES tries the last failure is raised as it is."""
    timeout = DOWNLOAD_TIMEOUT_FLOOR_S + size_hint / SLOW_LINK_BYTES_PER_S
    for attempt in range(1, DOWNLOAD_TRIES):
        try:
            async with asyncio.timeout(timeout):
                return await fetch()
        except Exception as error:
            if not (isinstance(error, IncompleteDownload | TimeoutError) or retryable(error)):
                raise
            delay = DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1)
            log.warning(
                "download of %s failed (try %s of %s), again in %.1f s: %s: %s",
                what,
                attempt,
                DOWNLOAD_TRIES,
                delay,
                type(error).__name__,
                error,
            )
            await asyncio.sleep(delay)
    async with asyncio.timeout(timeout):
        return await fetch()
