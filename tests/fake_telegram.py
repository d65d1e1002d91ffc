"""A fake Telegram Bot API server on 127.0.0.1 for the adapter tests.

It speaks the real protocol (form-encoded and multipart requests, `{"ok": ...}` answers, long-polled getUpdates,
file downloads under /file/bot<token>/) closely enough for python-telegram-bot's real HTTP layer, keeps what the
bot sent, and can answer with the errors Telegram gives: 400 "message is not modified", 413, 429 with retry_after,
and, as Telegram does by itself, 400 "message is too long" for a text over 4096 characters or a caption over 1024;
it can also answer late (`delays`) and fail file downloads the ways a file server does (`file_faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_faults import faulty_file

BOT_ID = 4242
BOT_USERNAME = "wanbot_test_bot"
# The token the tests configure: it must never appear in a log.
TEST_TOKEN = "123456:TEST-token-do-not-log"
TEXT_LIMIT, CAPTION_LIMIT = 4096, 1024  # what Telegram takes; a longer text is refused with 400


@dataclass
class Sent:
    """One call the bot made, with its fields (files as their byte size)."""

    method: str
    fields: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


class FakeTelegram:
    def __init__(self, token: str, upload_limit: int = 50_000_000) -> None:
        self.token = token
        self.upload_limit = upload_limit
        self.calls: list[Sent] = []
        self.reactions: dict[tuple[int, int], list[str]] = {}  # each message's reactions, in the order set
        self.no_reactions: set[int] = set()  # chats whose admins turned reactions off
        self.inline_answers: dict[str, list[dict[str, Any]]] = {}  # inline query id -> the results answered
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self.files: dict[str, tuple[str, bytes]] = {}
        self.faults: dict[str, list[tuple[int, str, dict[str, Any] | None]]] = {}
        # Seconds to wait before answering the next calls of a method; the call is carried out all the same.
        self.delays: dict[str, list[float]] = {}
        self.file_faults: list[str] = []  # how the next file downloads go wrong: see fake_faults.FILE_FAULTS
        self.downloads: list[str] = []  # the paths of /file/ requests, in order
        self.gates: dict[str, asyncio.Event] = {}
        self.undeclared_sizes: set[str] = set()
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._new_update = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- server ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        # A call held by a gate (one of a killed process) would hold the shutdown for aiohttp's default 60 s.
        # No access log: its lines carry the bot token in the path, and are the fake server's, not wanbot's.
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        fields, files = await _read_fields(request)
        self.calls.append(Sent(method, fields, files))
        if method in self.gates:  # a slow Telegram: the call waits until the test opens the gate
            await self.gates[method].wait()
        if self.delays.get(method):
            await asyncio.sleep(self.delays[method].pop(0))
        if self.faults.get(method):
            status, description, parameters = self.faults[method].pop(0)
            return _error(status, description, parameters)
        handler = getattr(self, f"_do_{method}", None)
        if handler is None:
            return _error(404, f"Not Found: method {method} is not faked")
        result = handler(fields, files)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, web.Response):
            return result
        return web.json_response({"ok": True, "result": result})

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.downloads.append(request.match_info["path"])
        for path, data in self.files.values():
            if path == request.match_info["path"]:
                if self.file_faults:
                    return await faulty_file(request, self.file_faults.pop(0), data)
                return web.Response(body=data)
        return web.Response(status=404)

    # -- methods -----------------------------------------------------------------------------------------------

    def _do_getMe(self, fields: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return {
            "id": BOT_ID,
            "is_bot": True,
            "first_name": "wanbot",
            "username": BOT_USERNAME,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    def _do_deleteWebhook(self, fields: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    def _do_setMyCommands(self, fields: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    def _do_answerCallbackQuery(self, fields: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    def _do_answerInlineQuery(self, fields: dict[str, Any], files: dict[str, bytes]) -> bool:
        results = fields["results"]
        self.inline_answers[fields["inline_query_id"]] = json.loads(results) if isinstance(results, str) else results
        return True

    def _do_setMessageReaction(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id, message_id = int(fields["chat_id"]), int(fields["message_id"])
        if chat_id in self.no_reactions:
            return _error(400, "Bad Request: REACTION_INVALID")
        reaction = json.loads(fields["reaction"]) if isinstance(fields["reaction"], str) else fields["reaction"]
        self.reactions.setdefault((chat_id, message_id), []).append(reaction[0]["emoji"] if reaction else "")
        return True

    async def _do_getUpdates(self, fields: dict[str, Any], files: dict[str, bytes]) -> list[dict[str, Any]]:
        offset = int(fields.get("offset") or 0)
        # As the real Bot API: asking for a later offset confirms the updates before it, which are then forgotten,
        # also for the next process polling with this token.
        self._updates = [update for update in self._updates if update["update_id"] >= offset]
        deadline = time.monotonic() + min(float(fields.get("timeout") or 0), 1.0)
        while True:
            ready = [update for update in self._updates if update["update_id"] >= offset]
            if ready or time.monotonic() >= deadline:
                return ready
            self._new_update.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_update.wait(), timeout=max(deadline - time.monotonic(), 0.01))

    def _do_sendMessage(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if len(fields["text"]) > TEXT_LIMIT:
            return _error(400, "Bad Request: message is too long")
        return self._store(int(fields["chat_id"]), {"text": fields["text"]}, fields)

    def _do_editMessageText(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if len(fields["text"]) > TEXT_LIMIT:
            return _error(400, "Bad Request: message is too long")
        key = (int(fields["chat_id"]), int(fields["message_id"]))
        if key not in self.messages:
            return _error(400, "Bad Request: message to edit not found")
        message = self.messages[key]
        markup = fields.get("reply_markup")
        if message.get("text") == fields["text"] and message.get("reply_markup") == markup:
            return _error(
                400,
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message",
            )
        message["text"] = fields["text"]
        message["reply_markup"] = markup
        message["edits"] = message.get("edits", 0) + 1
        return {key: value for key, value in message.items() if key not in ("edits", "reply_markup")}

    def _do_sendPhoto(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if len(fields.get("caption", "")) > CAPTION_LIMIT:
            return _error(400, "Bad Request: message caption is too long")
        content = {"photo": self._photo_sizes(files["photo"]), "caption": fields.get("caption", "")}
        return self._store(int(fields["chat_id"]), content, fields)

    def _do_editMessageMedia(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        media = json.loads(fields["media"])
        message = self.messages.get((int(fields["chat_id"]), int(fields["message_id"])))
        if message is None or "photo" not in message:
            return _error(400, "Bad Request: message to edit not found" if message is None else "there is no media")
        if len(media.get("caption", "")) > CAPTION_LIMIT:
            return _error(400, "Bad Request: message caption is too long")
        message.update(photo=self._photo_sizes(files[media["media"].removeprefix("attach://")]))
        return self._edited(message, {"caption": media.get("caption", "")}, fields)

    def _do_editMessageCaption(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self.messages.get((int(fields["chat_id"]), int(fields["message_id"])))
        if message is None:
            return _error(400, "Bad Request: message to edit not found")
        if message.get("caption") == fields.get("caption", "") and message.get("reply_markup") == fields.get(
            "reply_markup"
        ):
            return _error(400, "Bad Request: message is not modified")
        if len(fields.get("caption", "")) > CAPTION_LIMIT:
            return _error(400, "Bad Request: message caption is too long")
        return self._edited(message, {"caption": fields.get("caption", "")}, fields)

    def _do_deleteMessage(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if self.messages.pop((int(fields["chat_id"]), int(fields["message_id"])), None) is None:
            return _error(400, "Bad Request: message to delete not found")
        return True

    def _photo_sizes(self, data: bytes) -> list[dict[str, Any]]:
        file_id = f"sent-{len(self.files)}"
        self.files[file_id] = (f"sent/{file_id}.jpg", data)
        return [{"file_id": file_id, "file_unique_id": file_id, "file_size": len(data), "width": 1, "height": 1}]

    def _edited(self, message: dict[str, Any], content: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        message.update(content, reply_markup=fields.get("reply_markup"), edits=message.get("edits", 0) + 1)
        return {key: value for key, value in message.items() if key not in ("edits", "reply_markup")}

    def _do_sendVideo(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._send_file("video", fields, files)

    def _do_sendDocument(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._send_file("document", fields, files)

    def _send_file(self, kind: str, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if len(fields.get("caption", "")) > CAPTION_LIMIT:
            return _error(400, "Bad Request: message caption is too long")
        data = files.get(kind, b"")
        if len(data) > self.upload_limit:
            return _error(413, "Request Entity Too Large")
        file_id = f"sent-{len(self.files)}"
        self.files[file_id] = (f"sent/{file_id}.mp4", data)
        attachment = {"file_id": file_id, "file_unique_id": file_id, "file_size": len(data)}
        if kind == "video":
            attachment.update(
                width=int(fields.get("width", 0)),
                height=int(fields.get("height", 0)),
                duration=int(fields.get("duration", 0)),
            )
        return self._store(int(fields["chat_id"]), {kind: attachment, "caption": fields.get("caption", "")}, fields)

    def _do_getFile(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if fields["file_id"] not in self.files:
            return _error(400, "Bad Request: invalid file_id")
        path, data = self.files[fields["file_id"]]
        answer = {"file_id": fields["file_id"], "file_unique_id": fields["file_id"], "file_path": path}
        if fields["file_id"] not in self.undeclared_sizes:  # Bot API: file_size "if known"
            answer["file_size"] = len(data)
        return answer

    def _store(self, chat_id: int, content: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        message_id = next(self._message_ids)
        message = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private"},
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "wanbot", "username": BOT_USERNAME},
            **content,
        }
        self.messages[(chat_id, message_id)] = {**message, "reply_markup": fields.get("reply_markup")}
        return message

    # -- what a user does --------------------------------------------------------------------------------------

    def push(self, kind: str, payload: dict[str, Any]) -> None:
        self._updates.append({"update_id": next(self._update_ids), kind: payload})
        self._new_update.set()

    def user_message(
        self, user_id: int, chat_id: int | None = None, chat_type: str = "private", **content: Any
    ) -> dict[str, Any]:
        message = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id or user_id, "type": chat_type},
            "from": {"id": user_id, "is_bot": False, "first_name": f"user{user_id}", "username": f"u{user_id}"},
            **content,
        }
        self.push("message", message)
        return message

    def command(self, user_id: int, text: str, **extra: Any) -> dict[str, Any]:
        length = len(text.split()[0])
        entities = [{"type": "bot_command", "offset": 0, "length": length}]
        return self.user_message(user_id, text=text, entities=entities, **extra)

    def upload(self, data: bytes, name: str = "file") -> dict[str, Any]:
        file_id = f"in-{len(self.files)}-{name}"
        self.files[file_id] = (f"incoming/{file_id}", data)
        return {"file_id": file_id, "file_unique_id": file_id, "file_size": len(data)}

    def photo(self, user_id: int, data: bytes, caption: str | None = None, **extra: Any) -> dict[str, Any]:
        large = {**self.upload(data, "photo"), "width": 128, "height": 96}
        thumb = {**self.upload(data[:10], "thumb"), "width": 32, "height": 24}
        content: dict[str, Any] = {"photo": [thumb, large], **extra}
        if caption is not None:
            content["caption"] = caption
        return self.user_message(user_id, **content)

    def document(
        self,
        user_id: int,
        data: bytes,
        file_name: str,
        caption: str | None = None,
        mime_type: str = "image/png",
        size: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        document = {**self.upload(data, file_name), "file_name": file_name, "mime_type": mime_type}
        if size is not None:
            document["file_size"] = size
        if size == 0:  # no declared size anywhere, as Telegram may send for a document
            del document["file_size"]
            self.undeclared_sizes.add(document["file_id"])
        content: dict[str, Any] = {"document": document, **extra}
        if caption is not None:
            content["caption"] = caption
        return self.user_message(user_id, **content)

    def inline(self, user_id: int, words: str) -> str:
        """A user typing "@bot words" in some chat; the query's id, under which inline_answers gets the bot's answer."""
        query_id = f"iq-{next(self._update_ids)}"
        sender = {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"}
        self.push("inline_query", {"id": query_id, "from": sender, "query": words, "offset": "", "chat_type": "group"})
        return query_id

    def press(self, user_id: int, message: dict[str, Any], data: str) -> None:
        self.push(
            "callback_query",
            {
                "id": f"cq-{next(self._update_ids)}",
                "chat_instance": "ci",
                "data": data,
                "from": {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"},
                "message": {key: value for key, value in message.items() if key not in ("edits", "reply_markup")},
            },
        )

    # -- what the tests look at --------------------------------------------------------------------------------

    def sent(self, method: str, chat_id: int | None = None) -> list[Sent]:
        return [
            call
            for call in self.calls
            if call.method == method and (chat_id is None or int(call.fields.get("chat_id", 0)) == chat_id)
        ]

    def replies(self, chat_id: int) -> list[dict[str, Any]]:
        return [message for (chat, _), message in sorted(self.messages.items()) if chat == chat_id]


async def _read_fields(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    if request.content_type == "multipart/form-data":
        reader = await request.multipart()
        async for part in reader:
            if part.filename:
                files[part.name] = await part.read()
            else:
                fields[part.name] = await part.text()
    elif request.content_type == "application/json":
        fields = await request.json()
    elif request.can_read_body:
        fields = dict(await request.post())
    else:
        fields = dict(request.query)
    return fields, files


def _error(status: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")
