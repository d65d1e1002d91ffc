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


class CuttableLink:
    """A TCP relay on 127.0.0.1 to a real server (PostgreSQL), whose cable the test can pull: `cut()` drops every
    connection and refuses new ones until `mend()`."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.is_cut = False
        self.is_stalled = False
        self.port = 0

    async def __aenter__(self) -> CuttableLink:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def stall(self) -> None:
        """Packets vanish without a reset (a network that drops them): connections stay open, nothing arrives."""
        self.is_stalled = True

    def cut(self) -> None:
        self.is_cut = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def mend(self) -> None:
        self.is_cut = False

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, upstream_writer))
        await asyncio.gather(_pipe(reader, upstream_writer, self), _pipe(upstream_reader, writer, self))
        self._open.difference_update((writer, upstream_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: CuttableLink) -> None:
    try:
        while data := await reader.read(65536):
            if not link.is_stalled:
                writer.write(data)
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()
