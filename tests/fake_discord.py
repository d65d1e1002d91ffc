"""A fake Discord on 127.0.0.1 for the adapter tests: REST (/api/v10), the gateway websocket and a CDN, in one aiohttp
app, speaking the shapes discord.py parses. It records what the bot did and can answer with Discord's errors: 404
Unknown Message, 401 for an expired interaction token, 413, 429 with the `Via` header that discord.py needs before it
retries, and, as Discord does by itself, 400 for content over 2000 characters. Like Discord it answers a channel
message whose `nonce` it has seen (with `enforce_nonce`) with the message already made, and lists a channel's latest
messages. It can also lose an upload's answer after doing the work (`lost_uploads`), drop an upload unread
(`dropped_uploads`) and fail CDN downloads the ways a file server does (`cdn_faults`).

User installs: an interaction can come from a user who added the app to their own account (`where=`): in another server
the bot is not in (`OTHER_GUILD_ID`, `OTHER_CHANNEL_ID`), a group DM, or their DM with the bot; its
`authorizing_integration_owners` then names the user ("1") and no server ("0"). Like Discord, the fake answers 403
Missing Access (code 50001) to a bot that posts to, edits in or reads a channel it is not in, and opens DM channels
(POST users/@me/channels).

Components V2 (a message flagged IS_COMPONENTS_V2: layout components instead of content): like Discord, the fake
refuses such a message with content, with more than 4000 characters of text, or with a media item that names an
attachment the message does not carry. `text_of` and `custom_ids` read a message of either kind."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.fake_faults import drop_connection, faulty_file

APPLICATION_ID = 900000000000000001
BOT_USER = {
    "id": str(APPLICATION_ID),
    "username": "wanbot",
    "discriminator": "0",
    "global_name": "wanbot",
    "avatar": None,
    "bot": True,
    "flags": 0,
}
# The token the tests configure: it must never appear in a log.
TEST_TOKEN = "discord-TEST-token-do-not-log"
GUILD_ID = 800000000000000001
CONTENT_LIMIT = 2000  # characters in a message; Discord refuses more with 400 Invalid Form Body (code 50035)
COMPONENTS_V2 = 1 << 15  # the message flag IS_COMPONENTS_V2
CARD_TEXT_LIMIT = 4000  # characters of text in all of a Components V2 message's text displays
CHANNEL_ID = 700000000000000001
# Where an interaction happens (FakeDiscord.slash's `where`): the bot's server, or, for a user who added the app to
# their own account, a server that has not added the bot, a group DM, or their DM with the bot.
WHERE = ("server", "other_server", "group_dm", "bot_dm")
OTHER_GUILD_ID = 800000000000000002
OTHER_CHANNEL_ID = 700000000000000002
GROUP_DM_ID = 700000000000000003
ROLE_IDS = (555, 1)


@dataclass
class Call:
    method: str
    path: str
    body: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


class FakeDiscord:
    def __init__(self, token: str, upload_limit: int = 10 * 1024 * 1024, token_lifetime_s: float = 900) -> None:
        self.token = token
        self.upload_limit = upload_limit
        # (when, message id, files) of each edit that attached files
        self.attached: list[tuple[float, int, dict[str, bytes]]] = []
        self.token_lifetime_s = token_lifetime_s
        self.age_restricted = False  # whether the channel of the interactions is marked NSFW
        self.calls: list[Call] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.originals: dict[str, int] = {}  # interaction token -> message id of its original response
        self.interactions: dict[str, float] = {}  # interaction token -> when it was created (monotonic)
        self.interaction_channels: dict[str, int] = {}  # interaction token -> the channel it happened in
        self.dm_channels: dict[int, int] = {}  # user id -> the bot's DM channel with them
        self.dispatched_at: dict[str, float] = {}
        self.cdn: dict[str, bytes] = {}
        self.faults: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.lost_uploads = 0  # how many of the next uploads are carried out, then answered by a dropped connection
        self.dropped_uploads = 0  # how many of the next uploads are dropped unread, before anything is posted
        self.cdn_faults: list[str] = []  # how the next CDN downloads go wrong: see fake_faults.FILE_FAULTS
        self.downloads: list[str] = []  # the names of CDN requests, in order
        self.cdn_gate: asyncio.Event | None = None
        self._nonces: dict[tuple[int, str], int] = {}  # (channel, nonce) -> the message posted with it
        self.commands: dict[str, list[dict[str, Any]]] = {}
        self.suggestions: dict[str, list[dict[str, Any]]] = {}  # autocomplete interaction id -> the choices
        self.modals: dict[str, dict[str, Any]] = {}  # interaction id -> the modal the bot answered it with
        self._ids = itertools.count(600000000000000001)
        self._sequence = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- server ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{path:.+}", self._rest_or_lost)
        # A call held by a gate (one of a killed process) would hold the shutdown for aiohttp's default 60 s.
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        for socket in self._sockets:
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/gateway"

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.downloads.append(request.match_info["name"])
        if self.cdn_gate is not None:  # a slow CDN: the download waits until the test opens the gate
            await self.cdn_gate.wait()
        data = self.cdn.get(request.match_info["name"])
        if data is not None and self.cdn_faults:
            return await faulty_file(request, self.cdn_faults.pop(0), data)
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.append(socket)
        await socket.send_json({"op": 10, "d": {"heartbeat_interval": 45000}})
        async for frame in socket:
            if frame.type != WSMsgType.TEXT:
                continue
            payload = json.loads(frame.data)
            if payload["op"] == 1:
                await socket.send_json({"op": 11})
            elif payload["op"] == 2:
                if payload["d"]["token"] != self.token:
                    await socket.close(code=4004, message=b"Authentication failed.")
                    break
                await socket.send_json(
                    {
                        "op": 0,
                        "t": "READY",
                        "s": next(self._sequence),
                        "d": {
                            "v": 10,
                            "user": BOT_USER,
                            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                            "session_id": "fake-session",
                            "resume_gateway_url": self.gateway_url,
                            "application": {"id": str(APPLICATION_ID), "flags": 0},
                            "shard": [0, 1],
                        },
                    }
                )
                await socket.send_json({"op": 0, "t": "GUILD_CREATE", "s": next(self._sequence), "d": _guild()})
        self._sockets.remove(socket)
        return socket

    async def _rest_or_lost(self, request: web.Request) -> web.Response:
        if self.dropped_uploads and request.content_type == "multipart/form-data":
            self.dropped_uploads -= 1
            return drop_connection(request)
        response = await self._rest(request)
        if self.lost_uploads and request.content_type == "multipart/form-data":  # only files go as multipart
            self.lost_uploads -= 1
            return drop_connection(request)
        return response

    async def _rest(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body, files = await _read_body(request)
        self.calls.append(Call(request.method, path, body, files))
        route = f"{request.method} {_route_name(path)}"
        if self.faults.get(route):
            status, payload = self.faults[route].pop(0)
            headers = {"Via": "1.1 google", "X-RateLimit-Scope": "user"} if status == 429 else {}
            return _json(payload, status=status, headers=headers)
        if not path.startswith(("interactions/", "webhooks/")) and request.headers.get("Authorization") != (
            f"Bot {self.token}"
        ):
            return _error(401, 0, "401: Unauthorized")
        if _content_too_long(body):
            return _json(
                {
                    "message": "Invalid Form Body",
                    "code": 50035,
                    "errors": {
                        "content": {
                            "_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]
                        }
                    },
                },
                status=400,
            )
        parts = path.split("/")
        if route == "GET users/@me":
            return _json(BOT_USER)
        if route == "POST users/@me/channels":
            return self._open_dm(int(body["recipient_id"]))
        if route == "GET oauth2/applications/@me":
            return _json(
                {
                    "id": str(APPLICATION_ID),
                    "name": "wanbot",
                    "icon": None,
                    "description": "",
                    "bot_public": True,
                    "bot_require_code_grant": False,
                    "owner": BOT_USER,
                    "verify_key": "00",
                    "flags": 0,
                    "interactions_endpoint_url": None,
                }
            )
        if route.endswith("commands") and request.method == "PUT":
            return self._sync(path, body)
        if route == "POST interactions/callback":
            return self._callback(parts[1], parts[2], body)
        if parts[0] == "webhooks":
            return self._webhook(request.method, parts, body, files)
        if parts[0] == "channels" and route == "GET channels/messages":
            return self._history(int(parts[1]), int(request.query.get("limit", "50")))
        if parts[0] == "channels":
            return self._channel(request.method, parts, body, files)
        return _error(404, 0, "404: Not Found")

    # -- routes ------------------------------------------------------------------------------------------------

    def _sync(self, path: str, body: Any) -> web.Response:
        stored = [
            {
                "description": "",  # context menu commands are sent without one and come back with ""
                "default_member_permissions": None,
                "dm_permission": True,
                "nsfw": False,
                **command,
                "id": str(next(self._ids)),
                "application_id": str(APPLICATION_ID),
                "version": "1",
                **({"guild_id": path.split("/")[3]} if "/guilds/" in path else {}),
            }
            for command in body
        ]
        self.commands[path] = stored
        return _json(stored)

    def _callback(self, interaction_id: str, token: str, body: dict[str, Any]) -> web.Response:
        kind = body.get("type")
        if kind == 9:
            self.modals[interaction_id] = body["data"]
            return _json({"interaction": {"id": interaction_id, "type": 2}, "resource": {"type": 9}})
        if kind == 8:
            self.suggestions[interaction_id] = body["data"]["choices"]
            return _json({"interaction": {"id": interaction_id, "type": 4}, "resource": {"type": 8}})
        channel_id = self.interaction_channels.get(token, CHANNEL_ID)
        message = self._message(channel_id, body.get("data", {}) if kind == 4 else {"content": ""}, {})
        self.originals[token] = message["id_int"]
        resource: dict[str, Any] = {"type": kind}
        if kind == 4:
            resource["message"] = _public(message)
        return _json(
            {
                "interaction": {
                    "id": interaction_id,
                    "type": 2,
                    "response_message_id": message["id"],
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(body.get("data", {}).get("flags", 0) & 64),
                },
                "resource": resource,
            }
        )

    def _token_expired(self, token: str) -> bool:
        return time.monotonic() - self.interactions.get(token, 0.0) > self.token_lifetime_s

    def _webhook(self, method: str, parts: list[str], body: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        token = parts[2]
        if self._token_expired(token):
            return _error(401, 50027, "Invalid Webhook Token")
        if method == "PATCH" and parts[-1] == "@original":
            return self._edit(self.originals.get(token), body, files)
        if method == "POST" and len(parts) == 3:
            return self._post(self.interaction_channels.get(token, CHANNEL_ID), body, files)
        return _error(404, 0, "404: Not Found")

    def _channel(self, method: str, parts: list[str], body: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        channel_id = int(parts[1])
        if channel_id not in self._bot_channels():
            return _error(403, 50001, "Missing Access")
        if method == "POST" and parts[2:] == ["messages"]:
            return self._post(channel_id, body, files)
        if method == "PATCH" and len(parts) == 4:
            return self._edit(int(parts[3]), body, files)
        return _error(404, 0, "404: Not Found")

    def _bot_channels(self) -> set[int]:
        """The channels the bot can see: those of its server, and its DMs."""
        return {CHANNEL_ID, *self.dm_channels.values()}

    def _open_dm(self, user_id: int) -> web.Response:
        channel_id = self.dm_channels.setdefault(user_id, next(self._ids))
        recipient = self.member(user_id)["user"]
        return _json({"id": str(channel_id), "type": 1, "recipients": [recipient], "last_message_id": None})

    def _history(self, channel_id: int, limit: int) -> web.Response:
        """A channel's latest messages, newest first."""
        if channel_id not in self._bot_channels():
            return _error(403, 50001, "Missing Access")
        latest = sorted((m for m in self.messages.values() if m["channel_id"] == str(channel_id)), key=_newest_first)
        return _json([_public(message) for message in latest[:limit]])

    def _post(self, channel_id: int, body: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        if any(len(data) > self.upload_limit for data in files.values()):
            return _error(413, 40005, "Request entity too large")
        refusal = _components_v2_refusal(body, files)
        if refusal is not None:
            return _error(400, 50035, f"Invalid Form Body: {refusal}")
        nonce = (channel_id, str(body.get("nonce"))) if body.get("enforce_nonce") else None
        if nonce in self._nonces and self._nonces[nonce] in self.messages:
            return _json(_public(self.messages[self._nonces[nonce]]))
        message = self._message(channel_id, body, files)
        if nonce is not None:
            self._nonces[nonce] = message["id_int"]
        return _json(_public(message))

    def _edit(self, message_id: int | None, body: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        if message_id is None or message_id not in self.messages:
            return _error(404, 10008, "Unknown Message")
        message = self.messages[message_id]
        if "content" in body:
            message["content"] = body["content"]
        if "components" in body:
            message["components"] = body["components"]
        if files:  # new attachments replace the old ones (a preview); kept apart from posted files (videos)
            message["attachments"] = self._attachments(files)
            self.attached.append((time.monotonic(), message_id, files))
        message["edits"] += 1
        message["edited_timestamp"] = datetime.now(UTC).isoformat()
        return _json(_public(message))

    def _attachments(self, files: dict[str, bytes]) -> list[dict[str, Any]]:
        return [
            {
                "id": str(next(self._ids)),
                "filename": name,
                "size": len(data),
                "url": f"{self.url}/cdn/x",
                "proxy_url": f"{self.url}/cdn/x",
            }
            for name, data in files.items()
        ]

    def _message(self, channel_id: int, body: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        message_id = next(self._ids)
        attachments = self._attachments(files)
        message = {
            **_message_payload(message_id, channel_id, BOT_USER, body.get("content") or "", attachments),
            "components": body.get("components", []),
            "flags": body.get("flags", 0),
            "id_int": message_id,
            "edits": 0,
            "file_bytes": files,
        }
        self.messages[message_id] = message
        return message

    # -- what a user does --------------------------------------------------------------------------------------

    async def mark_age_restricted(self, on: bool) -> None:
        """A moderator marks the channel age-restricted (NSFW), or unmarks it: Discord tells the bot's gateway."""
        self.age_restricted = on
        await self.dispatch("CHANNEL_UPDATE", _channel_payload(on))

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        if not self._sockets:
            raise AssertionError("the bot is not connected to the gateway")
        await self._sockets[-1].send_json({"op": 0, "t": event, "s": next(self._sequence), "d": data})

    def member(self, user_id: int, roles: list[int] | None = None) -> dict[str, Any]:
        return {
            "user": {
                "id": str(user_id),
                "username": f"user{user_id}",
                "discriminator": "0",
                "global_name": None,
                "avatar": None,
            },
            "roles": [str(role) for role in roles or []],
            "joined_at": "2025-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "permissions": "2147483647",
        }

    def attachment(
        self, data: bytes, filename: str, content_type: str = "image/png", size: int | None = None
    ) -> dict[str, Any]:
        attachment_id = str(next(self._ids))
        self.cdn[attachment_id] = data
        return {
            "id": attachment_id,
            "filename": filename,
            "size": size if size is not None else len(data),
            "url": f"{self.url}/cdn/{attachment_id}",
            "proxy_url": f"{self.url}/cdn/{attachment_id}",
            "content_type": content_type,
            "ephemeral": True,
        }

    def _interaction(
        self,
        kind: int,
        user_id: int,
        data: dict[str, Any],
        roles: list[int] | None,
        size_limit: int,
        message: dict[str, Any] | None = None,
        where: str = "server",
    ) -> dict[str, Any]:
        """An interaction `where` (see WHERE): in the bot's server, or from a user who added the app to their own
        account, in another server, a group DM or their DM with the bot."""
        interaction_id = str(next(self._ids))
        token = f"itoken-{interaction_id}"
        member = self.member(user_id, roles)
        place: dict[str, Any]
        if where in ("server", "other_server"):
            guild_id, channel_id = (GUILD_ID, CHANNEL_ID) if where == "server" else (OTHER_GUILD_ID, OTHER_CHANNEL_ID)
            channel = _channel_payload(self.age_restricted, guild_id, channel_id)
            place = {"guild_id": str(guild_id), "channel": channel, "member": member, "context": 0}
        elif where == "group_dm":
            channel_id = GROUP_DM_ID
            channel = {"id": str(channel_id), "type": 3, "recipients": [member["user"]], "owner_id": str(user_id)}
            place = {"channel": channel, "user": member["user"], "context": 2}
        elif where == "bot_dm":
            channel_id = self.dm_channels.setdefault(user_id, next(self._ids))
            channel = {"id": str(channel_id), "type": 1, "recipients": [member["user"]]}
            place = {"channel": channel, "user": member["user"], "context": 1}
        else:
            raise ValueError(f"where is one of {WHERE}, not {where!r}")
        self.interactions[token] = time.monotonic()
        self.interaction_channels[token] = channel_id
        self.dispatched_at[interaction_id] = time.monotonic()
        payload = {
            "id": interaction_id,
            "application_id": str(APPLICATION_ID),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            **place,
            "token": token,
            "version": 1,
            "app_permissions": "2147483647",
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            # The app's installs that let this interaction happen: "0" a server's (its id), "1" the user's own.
            "authorizing_integration_owners": {"0": str(GUILD_ID)} if where == "server" else {"1": str(user_id)},
            "attachment_size_limit": size_limit,
        }
        if message is not None:
            payload["message"] = _public(message)
        return payload

    async def slash(
        self,
        user_id: int,
        name: str,
        options: dict[str, Any] | None = None,
        attachments: dict[str, dict[str, Any]] | None = None,
        roles: list[int] | None = None,
        size_limit: int = 10 * 1024 * 1024,
        where: str = "server",
    ) -> dict[str, Any]:
        types = {str: 3, int: 4, bool: 5, float: 10}
        option_list = [
            {"name": key, "type": types[type(value)], "value": value} for key, value in (options or {}).items()
        ]
        resolved: dict[str, Any] = {}
        for key, attachment in (attachments or {}).items():
            option_list.append({"name": key, "type": 11, "value": attachment["id"]})
            resolved[attachment["id"]] = attachment
        data = {
            "id": self._command_id(name),
            "name": name,
            "type": 1,
            "options": option_list,
            "guild_id": str(GUILD_ID),
        }
        if resolved:
            data["resolved"] = {"attachments": resolved}
        payload = self._interaction(2, user_id, data, roles, size_limit, where=where)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def autocomplete(
        self, user_id: int, name: str, options: dict[str, str], focused: str
    ) -> list[dict[str, Any]]:
        """A user typing in option `focused` of command `name`: the choices the bot suggests."""
        option_list = [
            {"name": key, "type": 3, "value": value, **({"focused": True} if key == focused else {})}
            for key, value in options.items()
        ]
        data = {"id": self._command_id(name), "name": name, "type": 1, "options": option_list}
        payload = self._interaction(4, user_id, data, None, 10 * 1024 * 1024)
        await self.dispatch("INTERACTION_CREATE", payload)
        deadline = time.monotonic() + 5
        while payload["id"] not in self.suggestions:
            if time.monotonic() > deadline:
                raise AssertionError(f"no suggestions for {name} {focused}")
            await asyncio.sleep(0.01)
        return self.suggestions[payload["id"]]

    def user_post(self, user_id: int, content: str, attachments: list[dict[str, Any]]) -> dict[str, Any]:
        """A message a user posted in the channel (not through the bot), as Discord would resolve it."""
        return _message_payload(next(self._ids), CHANNEL_ID, self.member(user_id)["user"], content, attachments)

    async def message_command(self, user_id: int, name: str, target: dict[str, Any]) -> dict[str, Any]:
        """A user picks `name` from the Apps menu of the message `target`."""
        data = {
            "id": self._command_id(name),
            "name": name,
            "type": 3,
            "target_id": target["id"],
            "guild_id": str(GUILD_ID),
            "resolved": {"messages": {target["id"]: target}},
        }
        payload = self._interaction(2, user_id, data, None, 10 * 1024 * 1024)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def submit_modal(self, user_id: int, opened_by: dict[str, Any], answers: dict[str, Any]) -> dict[str, Any]:
        """Fill in the modal the bot answered `opened_by` with, by the labels' texts, and submit it: a text input
        takes a text, a select its values, a file upload attachments made by `attachment` (the user's uploads)."""
        modal = self.modals[opened_by["id"]]
        components = []
        uploaded: dict[str, Any] = {}
        for label in modal["components"]:
            field_ = label["component"]
            answer = answers.get(label["label"])
            if field_["type"] == 4:
                submitted = {"type": 4, "custom_id": field_["custom_id"], "value": answer or ""}
            elif field_["type"] == 19:  # a file upload: the files' ids, each file resolved (self.attachment's)
                submitted = {
                    "type": 19,
                    "custom_id": field_["custom_id"],
                    "values": [file["id"] for file in answer or []],
                }
                uploaded.update({file["id"]: file for file in answer or []})
            else:
                submitted = {"type": field_["type"], "custom_id": field_["custom_id"], "values": answer or []}
            components.append({"type": 18, "component": submitted})
        data: dict[str, Any] = {"custom_id": modal["custom_id"], "components": components}
        if uploaded:
            data["resolved"] = {"attachments": uploaded}
        payload = self._interaction(5, user_id, data, None, 10 * 1024 * 1024)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    def _command_id(self, name: str) -> str:
        return next(
            command["id"] for commands in self.commands.values() for command in commands if command["name"] == name
        )

    async def click(self, user_id: int, message: dict[str, Any], custom_id: str) -> dict[str, Any]:
        payload = self._interaction(
            3, user_id, {"custom_id": custom_id, "component_type": 2}, None, 10 * 1024 * 1024, message
        )
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    # -- what the tests look at --------------------------------------------------------------------------------

    def calls_to(self, method: str, fragment: str) -> list[Call]:
        return [call for call in self.calls if call.method == method and fragment in call.path]

    def callback_delay(self, interaction: dict[str, Any]) -> float:
        call = next(call for call in self.calls if call.path.startswith(f"interactions/{interaction['id']}/"))
        return call.at - self.dispatched_at[interaction["id"]]

    def original(self, interaction: dict[str, Any]) -> dict[str, Any]:
        """The interaction's original response; empty until the bot has answered."""
        message_id = self.originals.get(interaction["token"])
        return self.messages.get(message_id, {"content": "", "edits": 0}) if message_id else {"content": "", "edits": 0}

    def with_files(self) -> list[dict[str, Any]]:
        return [message for message in self.messages.values() if message["file_bytes"]]

    @staticmethod
    def text_of(message: dict[str, Any]) -> str:
        """What a message says: its content, or a Components V2 message's text displays, one a line."""
        texts = [component["content"] for component in _walk(message["components"]) if component["type"] == 10]
        return "\n".join([message["content"], *texts] if message["content"] else texts)

    @staticmethod
    def custom_ids(message: dict[str, Any]) -> list[str]:
        """The custom ids of a message's buttons, wherever they are in its components."""
        return [component["custom_id"] for component in _walk(message["components"]) if component["type"] == 2]


def _message_payload(
    message_id: int, channel_id: int, author: dict[str, Any], content: str, attachments: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": str(message_id),
        "channel_id": str(channel_id),
        "type": 0,
        "content": content,
        "author": author,
        "attachments": attachments,
        "embeds": [],
        "mentions": [],
        "mention_roles": [],
        "pinned": False,
        "mention_everyone": False,
        "tts": False,
        "timestamp": datetime.now(UTC).isoformat(),
        "edited_timestamp": None,
        "flags": 0,
        "components": [],
    }


def _channel_payload(age_restricted: bool, guild_id: int = GUILD_ID, channel_id: int = CHANNEL_ID) -> dict[str, Any]:
    return {
        "id": str(channel_id),
        "type": 0,
        "guild_id": str(guild_id),
        "name": "videos",
        "position": 0,
        "permission_overwrites": [],
        "nsfw": age_restricted,
        "parent_id": None,
    }


def _guild() -> dict[str, Any]:
    def role(role_id: int, name: str) -> dict[str, Any]:
        return {
            "id": str(role_id),
            "name": name,
            "permissions": "0",
            "position": 0,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    return {
        "id": str(GUILD_ID),
        "name": "test guild",
        "icon": None,
        "owner_id": "1",
        "unavailable": False,
        "roles": [role(GUILD_ID, "@everyone"), *(role(role_id, f"role{role_id}") for role_id in ROLE_IDS)],
        "channels": [_channel_payload(age_restricted=False)],
        "members": [],
        "member_count": 3,
        "emojis": [],
        "stickers": [],
        "features": [],
        "threads": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "voice_states": [],
        "presences": [],
        "large": False,
        "system_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "premium_tier": 0,
        "preferred_locale": "en-US",
        "nsfw_level": 0,
        "premium_progress_bar_enabled": False,
        "joined_at": "2025-01-01T00:00:00+00:00",
    }


def _walk(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every component, depth first: rows and containers hold `components`, a label or section its `component` and
    `accessory`."""
    found = []
    for component in components:
        found.append(component)
        inner = [
            *component.get("components", []),
            *(component[key] for key in ("component", "accessory") if key in component),
        ]
        found.extend(_walk(inner))
    return found


def _components_v2_refusal(body: dict[str, Any], files: dict[str, bytes]) -> str | None:
    """Why Discord refuses a Components V2 message (None: it does not, or the message is not one)."""
    if not body.get("flags", 0) & COMPONENTS_V2:
        return None
    if body.get("content"):
        return "content cannot be used with IS_COMPONENTS_V2"
    components = _walk(body.get("components", []))
    if sum(len(component["content"]) for component in components if component["type"] == 10) > CARD_TEXT_LIMIT:
        return f"text displays hold more than {CARD_TEXT_LIMIT} characters"
    media = [item["media"]["url"] for component in components if component["type"] == 12 for item in component["items"]]
    missing = [
        url for url in media if url.startswith("attachment://") and url.removeprefix("attachment://") not in files
    ]
    return f"no attachment for {missing[0]}" if missing else None


def _content_too_long(body: Any) -> bool:
    """A message's text over Discord's limit, sent directly or as an interaction's answer."""
    if not isinstance(body, dict):
        return False  # a command sync sends a list
    content = body.get("content") or (body.get("data") or {}).get("content") or ""
    return isinstance(content, str) and len(content) > CONTENT_LIMIT


def _route_name(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "interactions":
        return "interactions/callback"
    if parts[0] == "webhooks":
        return "webhooks/original" if parts[-1] == "@original" else "webhooks/followup"
    if parts[0] == "channels":
        return "channels/message" if len(parts) == 4 else "channels/messages"
    return path


def _newest_first(message: dict[str, Any]) -> int:
    return -message["id_int"]


def _public(message: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key not in ("id_int", "edits", "file_bytes")}


async def _read_body(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    if request.content_type == "multipart/form-data":
        body: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        reader = await request.multipart()
        async for part in reader:
            if part.name == "payload_json":
                body = json.loads(await part.text())
            elif part.filename:
                files[part.filename] = await part.read()
        return body, files
    if request.can_read_body:
        text = await request.text()
        return (json.loads(text) if text else {}), {}
    return {}, {}


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py parses a body as JSON only when Content-Type is exactly application/json (no charset).
    return web.Response(
        body=json.dumps(payload).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"message": message, "code": code}, status=status)
