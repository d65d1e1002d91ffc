"""A fake Hugging Face Hub on 127.0.0.1 serving a folder as a model repo, for the download tests.

It answers the calls huggingface_hub and wanbot make (revision and tree APIs, HEAD/GET resolve with X-Repo-Commit,
ETag, Content-Length and Range), redirects LFS files to a second origin as the Hub does, and injects faults per
file: a connection closed mid-file or after `drop_after` bytes, a reset, a stall, 503 and 429 bursts (429 with the
Retry-After written after it, "429 Wed, 21 Oct 2015 07:28:00 GMT"), a pause the test releases ("pause" then closes,
"hold" goes on). `api_faults` make the revision or tree API answer an HTML page ("html") or entries without the
fields a file has ("fieldless"), every time.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    size: int
    sha256: str
    git_oid: str  # what git names the file by: the Hub's ETag and tree oid of a small file
    lfs: bool


@dataclass
class FakeHub:
    repo_id: str
    folder: Path
    faults: dict[str, list[str]] = field(default_factory=dict)
    api_faults: dict[str, str] = field(default_factory=dict)  # "revision" or "tree" -> "html" or "fieldless"
    drop_after: int = 10_000
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    paused: asyncio.Event = field(default_factory=asyncio.Event)
    pause_reached: asyncio.Event = field(default_factory=asyncio.Event)
    chunk: int = 16 * 1024
    url: str = ""
    cdn_url: str = ""

    def __post_init__(self) -> None:
        self.files: dict[str, Served] = {}
        for path in sorted(self.folder.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                relative = path.relative_to(self.folder).as_posix()
                self.files[relative] = Served(
                    len(data),
                    hashlib.sha256(data).hexdigest(),
                    hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                    relative.endswith((".safetensors", ".bin", ".png")),
                )
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        hub = web.Application()
        hub.router.add_get("/api/models/{owner}/{name}/revision/{revision}", self._revision)
        hub.router.add_get("/api/models/{owner}/{name}/tree/{revision}", self._tree)
        hub.router.add_route("*", "/{owner}/{name}/resolve/{revision}/{path:.+}", self._resolve)
        cdn = web.Application()
        cdn.router.add_route("*", "/lfs/{path:.+}", self._lfs)
        self.url = await self._serve(hub)
        self.cdn_url = await self._serve(cdn)

    async def _serve(self, app: web.Application) -> str:
        # A stalled answer sleeps for an hour: stopping must not wait for it (aiohttp's default is a minute).
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self.paused.set()
        for runner in self._runners:
            await runner.cleanup()

    def _repo_ok(self, request: web.Request) -> bool:
        return f"{request.match_info['owner']}/{request.match_info['name']}" == self.repo_id

    async def _revision(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path, ""))
        if self.api_faults.get("revision") == "html":
            return _login_page()
        if not self._repo_ok(request):
            return web.json_response(
                {"error": "Repository not found"}, status=404, headers={"X-Error-Code": "RepoNotFound"}
            )
        return web.json_response(
            {"id": self.repo_id, "sha": COMMIT, "siblings": [{"rfilename": path} for path in self.files]}
        )

    async def _tree(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path, ""))
        if not self._repo_ok(request):
            return web.json_response({"error": "Repository not found"}, status=404)
        if self.api_faults.get("tree") == "html":
            return _login_page()
        if self.api_faults.get("tree") == "fieldless":
            return web.json_response([{"type": "file", "path": path} for path in self.files])
        entries: list[dict[str, Any]] = []
        for path, served in self.files.items():
            entry: dict[str, Any] = {"type": "file", "path": path, "size": served.size, "oid": served.git_oid}
            if served.lfs:
                entry["lfs"] = {"oid": served.sha256, "size": served.size, "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests.append((request.method, request.path, request.headers.get("Range", "")))
        if not self._repo_ok(request) or path not in self.files:
            return web.json_response(
                {"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"}
            )
        served = self.files[path]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{served.git_oid}"'}
        if served.lfs:
            headers.update(
                {
                    "Location": f"{self.cdn_url}/lfs/{path}",
                    "X-Linked-Etag": f'"{served.sha256}"',
                    "X-Linked-Size": str(served.size),
                }
            )
            return web.Response(status=302, headers=headers)
        return await self._body(request, path, headers)

    async def _lfs(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests.append((request.method, f"cdn:{path}", request.headers.get("Range", "")))
        return await self._body(request, path, {"ETag": f'"{self.files[path].sha256}"'})

    async def _body(self, request: web.Request, path: str, headers: dict[str, str]) -> web.StreamResponse:
        fault = self.faults.get(path, []).pop(0) if self.faults.get(path) else None
        if fault == "503":
            return web.Response(status=503, text="Service Unavailable")
        if fault and fault.startswith("429"):
            retry_after = fault[4:] or "0"
            return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": retry_after})
        data = (self.folder / path).read_bytes()
        start = 0
        status = 200
        if (ranged := request.headers.get("Range", "")).startswith("bytes="):
            start = int(ranged[6:].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(body))})
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        if fault == "drop":
            await response.write(body[: self.drop_after])
            request.transport.close()
            return response
        half = len(body) // 2
        held = False
        for offset in range(0, len(body), self.chunk):
            if offset >= half and fault == "hold" and not held:
                held = True
                self.pause_reached.set()
                await self.paused.wait()
            if offset >= half and fault in ("close", "reset", "stall", "pause"):
                if fault == "close":
                    request.transport.close()
                    return response
                if fault == "reset":
                    request.transport.abort()
                    return response
                if fault == "pause":
                    self.pause_reached.set()
                    await self.paused.wait()
                    request.transport.close()
                    return response
                await asyncio.sleep(3600)  # stall: the client's read timeout must end this
            await response.write(body[offset : offset + self.chunk])
        await response.write_eof()
        return response


def _login_page() -> web.Response:
    """What a proxy or captive portal answers in the Hub's place: HTML, with 200 OK."""
    return web.Response(text="<!doctype html><html><body>Please log in</body></html>", content_type="text/html")
