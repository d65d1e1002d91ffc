"""What goes wrong on the way, for the fake servers: a file server's failures, and an answer lost after the work
was done. Each fake keeps a list of fault names; the next request takes the first one."""

from __future__ import annotations

import asyncio

from aiohttp import web

# "500": a server error. "reset": the connection closes with no answer. "truncated": Content-Length says the whole
# file, half of it comes, then the connection closes. "short": a complete answer with half the file. "stall": no
# answer for STALL_S seconds, then the file.
FILE_FAULTS = ("500", "reset", "truncated", "short", "stall")
STALL_S = 5.0


async def faulty_file(request: web.Request, fault: str, data: bytes) -> web.StreamResponse:
    if fault == "500":
        return web.Response(status=500, text="Internal Server Error")
    if fault == "reset":
        return drop_connection(request)
    if fault == "truncated":
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        return drop_connection(request)
    if fault == "short":
        return web.Response(body=data[: len(data) // 2])
    if fault == "stall":
        await asyncio.sleep(STALL_S)
        return web.Response(body=data)
    raise ValueError(f"unknown file fault {fault!r}; one of {FILE_FAULTS}")


def drop_connection(request: web.Request) -> web.Response:
    """Close the connection under the request: the client gets no (further) answer."""
    assert request.transport is not None
    request.transport.close()
    return web.Response()
