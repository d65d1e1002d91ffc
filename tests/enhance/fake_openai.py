"""A fake OpenAI-compatible chat completions endpoint on 127.0.0.1 for the enhancer's tests and benchmark.

`POST /v1/chat/completions` answers `content` as a chat completion and keeps every request it got. `faults` make
the next requests go wrong, one fault each, in order: "slow" (no answer until the server stops), "500", "503", "429"
and "401" (an OpenAI-style error body), "bad json" (a 200 whose body is no JSON), "no choices" (JSON without them).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

FAULT_STATUS = {"500": 500, "503": 503, "429": 429, "401": 401}


@dataclass
class Received:
    headers: dict[str, str]
    body: Any

    @property
    def messages(self) -> dict[str, str]:
        """The request's messages by role."""
        return {message["role"]: message["content"] for message in self.body["messages"]}


@dataclass
class FakeOpenAI:
    content: str = "A ginger cat walks slowly through a rainy street at night, neon reflections on wet stones."
    faults: list[str] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    url: str = ""  # the base URL a client is configured with, like http://127.0.0.1:PORT/v1

    def __post_init__(self) -> None:
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        # A slow answer waits for the stop; aiohttp's default would hold the stop for a minute.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(Received(dict(request.headers), body))
        fault = self.faults.pop(0) if self.faults else None
        if fault == "slow":
            await self._stopping.wait()
        if fault in FAULT_STATUS:
            error = {"error": {"message": f"fake {fault}", "type": "fake_error", "code": fault}}
            return web.json_response(error, status=FAULT_STATUS[fault])
        if fault == "bad json":
            return web.Response(text="<html>a proxy's page</html>", content_type="text/html")
        if fault == "no choices":
            return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "choices": []})
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body.get("model", "fake"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": self.content}, "finish_reason": "stop"}
                ],
            }
        )
