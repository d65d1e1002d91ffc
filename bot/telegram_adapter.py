"""Telegram adapter (python-telegram-bot 22): messages, photos, documents and albums in; one live progress message
per job and the finished video out. It only translates; the engine and bot/chat.py hold the behaviour."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Opt in to python-telegram-bot's future time type now (RetryAfter.retry_after as a timedelta); _seconds takes both.
os.environ.setdefault("PTB_TIMEDELTA", "1")

import httpx
from telegram import BotCommand, InlineKeyboardButton, InlineKeyboardMarkup, Message, ReplyParameters, Update
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot import chat, transfers
from bot.logredact import redact_everywhere, remove_redactor
from bot.relay import Buttons, DeliveryFailed, JobRelay
from bot.telegram_polling import DurablePolling, message_key, seconds
from engine.config import TelegramConfig
from engine.errors import UserError, quoted
from engine.images import Mode
from engine.jobs import Actor, EnqueueResult, Job, JobSource
from engine.service import Engine, Upload
from engine.video import fit_to_limit

log = logging.getLogger(__name__)

PLATFORM = "telegram"
GROUP_REFRESH_LIMIT = 5
TEXT_LIMIT = 4096  # characters in a message; a video's caption may have 1024 (chat.result_caption's default)
COMMANDS = {"video": None, "t2v": Mode.T2V, "i2v": Mode.I2V, "ti2v": Mode.TI2V}
CAPTION_COMMAND = re.compile(r"^/(video|t2v|i2v|ti2v)(?:@(\w+))?(?:\s|$)", re.IGNORECASE)
TELEGRAM_HELP = (
    "/video a red fox running through snow: text to video (t2v)\n"
    "A photo with the caption /video the fox turns its head: image to video (i2v)\n"
    "Two photos in one album with /video: start and end frames\n"
    "/t2v, /i2v, /ti2v pick the mode.\n"
    "In a private chat with me /video is optional: any message, or a picture with a caption, is a request; "
    "a message that replies to a picture uses that picture.\n"
    "Tip: send pictures as files (documents); Telegram recompresses photos."
)
UNUSABLE_HINT = "I make videos from a text prompt or a picture: send either (a picture with a caption), or see /help."
PICTURE_HINT = (
    "Got the picture. What should happen in the video? Reply to it with a prompt (for example: the waves roll in), "
    "or send it again with the prompt as its caption."
)
HINTS_KEPT = 1000  # picture hints whose pictures a reply can still use; older ones (and all after a restart) cannot
REPLY_TO_VIDEO_NOTE = (
    "My video is not used as a picture, so this is text to video from your prompt. "
    "To animate a picture, reply to the picture itself."
)


@dataclass(frozen=True)
class ImageRef:
    """A picture in a Telegram message: enough to check its size and fetch it."""

    file_id: str
    file_size: int | None
    filename: str | None


class TelegramAdapter:
    def __init__(self, engine: Engine, config: TelegramConfig, poll_timeout_s: float = 10.0) -> None:
        if config.token is None:
            raise UserError("No Telegram token is configured.", "Set telegram.token or TELEGRAM_BOT_TOKEN.")
        self._token = config.token.get_secret_value()
        self._engine = engine
        self._config = config
        self._poll_timeout_s = poll_timeout_s
        self._access = chat.AccessPolicy(
            platform=PLATFORM,
            allowed_users=frozenset(str(user) for user in config.allowed_users),
            allowed_chats=frozenset(str(chat_id) for chat_id in config.allowed_chats),
            admins=frozenset(engine.settings.access.admins),
        )
        # A group's 20 messages a minute are shared by every job in it: only its first few places are refreshed.
        self._relay = JobRelay(
            engine.queue,
            engine.supervisor,
            PLATFORM,
            self._show,
            self._send_video,
            config,
            edit_interval_for=self._edit_interval,
            refresh_per_chat=GROUP_REFRESH_LIMIT,
        )
        self._albums: dict[tuple[int, str], list[Message]] = {}
        self._album_timers: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._album_updates: dict[tuple[int, str], list[int]] = {}
        # Telegram leaves the reply to a hint out of the hint a reply quotes: the hint's pictures are kept here.
        self._hint_pictures: dict[tuple[int, int], list[ImageRef]] = {}
        # Before the Application exists: building it already logs its base URL, token included.
        self._redactor = redact_everywhere(self._token)
        self.app: Application = (
            ApplicationBuilder()
            .token(self._token)
            .base_url(config.api_base_url)
            .base_file_url(config.file_base_url)
            .rate_limiter(AIORateLimiter(max_retries=3))
            .concurrent_updates(True)
            .updater(None)  # DurablePolling fetches the updates: it stores each one before Telegram forgets it
            .build()
        )
        self._polling = DurablePolling(
            self.app.bot,
            engine.queue,
            engine.supervisor,
            self.app.process_update,
            poll_timeout_s,
            allowed_updates=["message", "callback_query"],
        )
        self._add_handlers()

    # -- life cycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        events = self._engine.queue.events.subscribe()
        try:
            await self._connect()
        except TelegramError as error:
            # A rejected token or an unreachable API: say so in one line, and leave nothing running behind.
            events.close()
            await self.stop()
            reason = str(error).replace(self._token, "<token>")
            raise UserError(
                f"Telegram did not connect ({type(error).__name__}: {reason}).",
                "Check telegram.token, telegram.api_base_url and the network.",
            ) from None
        self._relay.start(events)

    async def _connect(self) -> None:
        await self.app.initialize()
        await self.app.bot.set_my_commands(
            [
                BotCommand("video", "Make a video: /video a fox in the snow"),
                BotCommand("t2v", "Text to video"),
                BotCommand("i2v", "Image to video (attach a picture)"),
                BotCommand("ti2v", "Text and image to video (attach a picture)"),
                BotCommand("queue", "Your jobs and their places in the queue"),
                BotCommand("cancel", "Cancel a job: /cancel or /cancel 12"),
                BotCommand("status", "What the worker is doing"),
                BotCommand("help", "How to use this bot"),
            ]
        )
        await self.app.start()
        await self._polling.start()

    async def stop(self) -> None:
        for timer in self._album_timers.values():
            timer.cancel()
        await self._polling.stop()
        await self._relay.stop()
        if self.app.running:
            await self.app.stop()
        await self.app.shutdown()
        remove_redactor(self._redactor)

    def _add_handlers(self) -> None:
        self.app.add_handler(CommandHandler(list(COMMANDS), self._on_video_command))
        self.app.add_handler(MessageHandler(filters.PHOTO | filters.Document.ALL, self._on_picture))
        self.app.add_handler(CommandHandler("queue", self._on_queue))
        self.app.add_handler(CommandHandler("cancel", self._on_cancel))
        self.app.add_handler(CommandHandler("status", self._on_status))
        self.app.add_handler(CommandHandler(["pause", "resume"], self._on_pause))
        self.app.add_handler(CommandHandler(["help", "start"], self._on_help))
        self.app.add_handler(CallbackQueryHandler(self._on_button, pattern=r"^(cancel|reroll):\d+$"))
        private = filters.ChatType.PRIVATE
        self.app.add_handler(MessageHandler(private & filters.TEXT & ~filters.COMMAND, self._on_private_text))
        self.app.add_handler(MessageHandler(private & filters.COMMAND, self._on_unknown_command))
        self.app.add_handler(MessageHandler(private & ~filters.StatusUpdate.ALL, self._on_unusable))
        self.app.add_error_handler(self._on_error)

    # -- incoming ----------------------------------------------------------------------------------------------

    async def _on_video_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        text = message.text.partition(" ")[2] if " " in message.text else ""
        await self._submit_text(message, text, COMMANDS.get(_command_name(message)))

    async def _on_picture(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message.media_group_id:
            key = (message.chat_id, message.media_group_id)
            self._albums.setdefault(key, []).append(message)
            # Open until the album is handled: a crash while it waits for its other photos must not lose it.
            self._polling.defer(update.update_id)
            self._album_updates.setdefault(key, []).append(update.update_id)
            if key in self._album_timers:
                self._album_timers[key].cancel()
            self._album_timers[key] = asyncio.create_task(self._album_complete(key))
            return
        request = self._caption_request(message)
        if request is not None:
            await self._submit(message, request[1], request[0], _images_of(message))
        elif _is_private(message):
            caption = (message.caption or "").split()
            if caption:
                await self._reply(message, _unknown_command_text(caption[0]))
            else:
                await self._send_picture_hint(message, _images_of(message))

    async def _on_private_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        await self._submit_text(message, message.text, None)

    async def _on_unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        await self._reply(message, _unknown_command_text(message.text.split()[0]))

    async def _on_unusable(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await update.effective_message.reply_text(UNUSABLE_HINT)

    async def _album_complete(self, key: tuple[int, str]) -> None:
        """Albums arrive as separate updates; once none has come for `album_wait_s`, treat them as one request."""
        await asyncio.sleep(self._config.album_wait_s)
        self._album_timers.pop(key, None)
        try:
            await self._handle_album(key)
        finally:
            await self._polling.done(*self._album_updates.pop(key, []))

    async def _handle_album(self, key: tuple[int, str]) -> None:
        messages = sorted(self._albums.pop(key, []), key=lambda item: item.message_id)
        captioned = next((item for item in messages if self._caption_request(item) is not None), None)
        if captioned is None:
            if messages and _is_private(messages[0]):
                await self._send_picture_hint(messages[0], [ref for item in messages for ref in _images_of(item)][:2])
            return
        mode, text = self._caption_request(captioned)
        images = [ref for item in messages for ref in _images_of(item)]
        notes = [chat.EXTRA_PICTURES_NOTE] if len(images) > 2 else []
        await self._submit(captioned, text, mode, images[:2], notes)

    async def _send_picture_hint(self, picture: Message, images: list[ImageRef]) -> None:
        """Ask for a prompt, and keep the pictures, so that a reply to the hint uses them."""
        hint = await self._reply(picture, PICTURE_HINT)
        self._hint_pictures[(hint.chat_id, hint.message_id)] = images
        while len(self._hint_pictures) > HINTS_KEPT:
            del self._hint_pictures[next(iter(self._hint_pictures))]

    async def _submit_text(self, message: Message, text: str, mode: Mode | None) -> None:
        """A text request, with the pictures of the message it replies to."""
        try:
            images, notes = self._pictures_replied_to(message)
        except UserError as error:
            await self._reply(message, chat.user_error_text(error))
            return
        await self._submit(message, text, mode, images, notes)

    def _pictures_replied_to(self, message: Message) -> tuple[list[ImageRef], list[str]]:
        """The pictures a request uses from the message it replies to, and notes on them. A reply to the bot's picture
        hint uses the picture the hint asked about; a reply to the bot's video is text to video, and says so."""
        replied = message.reply_to_message
        if replied is None:
            return [], []
        if replied.from_user is None or replied.from_user.id != self.app.bot.id:
            return _images_of(replied), []
        if replied.text == PICTURE_HINT:
            pictures = self._hint_pictures.get((replied.chat_id, replied.message_id))
            if pictures is None:
                raise UserError(
                    "I no longer have the picture that message asked about.",
                    "Send the picture again with the prompt as its caption.",
                )
            return pictures, []
        return [], [REPLY_TO_VIDEO_NOTE] if replied.video is not None else []

    def _caption_request(self, message: Message) -> tuple[Mode | None, str] | None:
        """The mode and text a caption asks for: a /video command anywhere, any plain caption in a private chat."""
        caption = message.caption or ""
        match = CAPTION_COMMAND.match(caption)
        if match is None:
            plain = caption.strip() and not caption.startswith("/")
            return (None, caption) if plain and _is_private(message) else None
        addressed_to = match.group(2)
        if addressed_to and addressed_to.lower() != (self.app.bot.username or "").lower():
            return None
        return COMMANDS[match.group(1).lower()], message.caption[match.end() :]

    async def _submit(
        self, message: Message, text: str, mode: Mode | None, images: list[ImageRef], notes: list[str] | None = None
    ) -> None:
        user, chat_id = message.from_user, message.chat_id
        if not self._access.allows(str(user.id), str(chat_id)):
            await message.reply_text("Sorry, you are not allowed to use this bot here.")
            return
        source = JobSource(
            platform=PLATFORM,
            chat_id=str(chat_id),
            user_id=str(user.id),
            user_name=user.username or user.first_name or "",
            message_id=str(message.message_id),
        )
        if await self._engine.queue.find_by_source(source) is not None:
            return  # Handled again after a restart, and already queued: its status message lives on.
        # Only a picture takes long enough (download, checks) to need a "Checking" message first. A text request's
        # first answer is its place, which the relay sends in event order: one message instead of two, which counts
        # when many users write at once and every message shares the bot's 30 a second.
        status_id = await self._status_message(message) if images else None
        source.reply = _reply_to(message, status_id)
        try:
            parsed = chat.parse_message(text, mode, has_image=bool(images))
            if images:
                await self._engine.check_room(source)  # the limits before any download or decode
            uploads = [await self._download(ref, role) for ref, role in zip(images, ("start", "end"), strict=False)]
            submission = await self._engine.submit(
                parsed.request,
                source,
                uploads[0] if uploads else None,
                uploads[1] if len(uploads) > 1 else None,
                notes=[*(notes or []), *parsed.notes],
            )
        except UserError as error:
            await self._answer(message, status_id, chat.user_error_text(error))
            return
        except Exception:
            log.exception("request failed chat=%s user=%s", chat_id, user.id)
            await self._answer(message, status_id, chat.apology())
            return
        await self._show_duplicate(submission.result, message, status_id)

    async def _status_message(self, message: Message) -> int:
        """The "Checking" message of this request: the one a stopped process sent already, or a new one."""
        key = message_key(message.chat_id, message.message_id)
        sent = await self._engine.queue.inbox_reply(PLATFORM, key)
        if sent is not None:
            return int(sent)
        status = await message.reply_text("Checking your request…")
        await self._engine.queue.inbox_set_reply(PLATFORM, key, str(status.message_id))
        return status.message_id

    async def _show_duplicate(self, result: EnqueueResult, request: Message, status_id: int | None) -> None:
        """A new job's place is shown by the relay, in event order; a request already queued is answered here."""
        if not result.created:
            paused = await self._engine.queue.is_paused()
            text = chat.queued_text(result.job, result.position, duplicate=True, paused=paused)
            await self._answer(request, status_id, text, _cancel_button(result.job.id))

    async def _download(self, ref: ImageRef, role: str) -> Upload:
        limit = self._config.download_limit_bytes
        if ref.file_size is not None and ref.file_size > limit:
            raise UserError(
                f"The {role} picture is {ref.file_size / 1e6:.1f} MB; bots can fetch at most {limit / 1e6:.0f} MB.",
                "Send a smaller or more compressed picture.",
            )

        async def fetch() -> bytes:
            # getFile again on each try: a file path Telegram handed out may be what stopped working.
            telegram_file = await self.app.bot.get_file(ref.file_id)
            declared = telegram_file.file_size or ref.file_size
            if declared is None:
                return await transfers.read_capped(telegram_file.file_path, limit, f"the {role} picture")
            data = bytes(await telegram_file.download_as_bytearray())
            return transfers.check_size(data, declared)

        data = await transfers.download(fetch, _worth_retrying, ref.file_size or limit, f"the {role} picture")
        return Upload(data, ref.filename)

    async def _on_queue(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        user_key = f"{PLATFORM}:{update.effective_user.id}"
        await self._reply(update.effective_message, await chat.queue_answer(self._engine.queue, user_key))

    async def _on_cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        try:
            job_id = await self._job_to_cancel(context.args, user.id)
            job = await self._engine.queue.cancel(job_id, self._actor(user.id))
        except UserError as error:
            await self._reply(message, chat.user_error_text(error))
            return
        await self._reply(message, chat.cancel_text(job))

    async def _job_to_cancel(self, args: list[str] | None, user_id: int) -> int:
        if args:
            if not args[0].lstrip("#").isdigit():
                raise UserError(
                    f"{quoted(args[0])} is not a job number.", "Use /cancel 12, or /cancel for your latest job."
                )
            return int(args[0].lstrip("#"))
        return await chat.latest_active_job(self._engine.queue, f"{PLATFORM}:{user_id}")

    async def _on_status(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._reply(update.effective_message, await chat.status_answer(self._engine))

    async def _on_pause(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        paused = _command_name(message) == "pause"
        try:
            text = await chat.pause_answer(self._engine.queue, self._actor(update.effective_user.id), paused)
        except UserError as error:
            text = chat.user_error_text(error)
        await self._reply(message, text)

    async def _on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await update.effective_message.reply_text(chat.help_text(TELEGRAM_HELP))

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        action, job_id = query.data.split(":")
        actor = self._actor(query.from_user.id)
        try:
            if action == "cancel":
                job = await self._engine.queue.cancel(int(job_id), actor)
                await query.answer(chat.cancel_text(job))
            else:
                await query.answer("Making another one with a new seed…")
                await self._reroll(query.message, int(job_id), actor, query.id)
        except UserError as error:
            await query.answer(chat.user_error_text(error)[:200], show_alert=True)

    async def _reroll(self, anchor: Message, job_id: int, actor: Actor, query_id: str) -> None:
        status = await anchor.reply_text(f"Rerolling job #{job_id}…")
        old = await self._engine.queue.get(job_id)
        source = old.source.model_copy(
            update={"message_id": f"reroll-{query_id}", "reply": _reply_to(anchor, status.message_id)}
        )
        try:
            result = await self._engine.reroll(job_id, actor, source)
        except UserError as error:
            await self._edit((anchor.chat_id, status.message_id), chat.user_error_text(error), None)
            return
        await self._show_duplicate(result, anchor, status.message_id)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram handler failed: %s", type(context.error).__name__, exc_info=context.error)

    def _edit_interval(self, job: Job) -> float:
        # Group chats have negative ids; one progress message at the private pace would use up the group's budget.
        group = int(job.source.chat_id) < 0
        return self._config.group_edit_interval_s if group else self._config.edit_interval_s

    def _actor(self, user_id: int) -> Actor:
        return Actor(platform=PLATFORM, user_id=str(user_id), is_admin=self._access.is_admin(str(user_id)))

    # -- outgoing ----------------------------------------------------------------------------------------------

    async def _show(self, job: Job, text: str, buttons: Buttons) -> None:
        markup = _cancel_button(job.id) if buttons == "cancel" else None
        # The relay's copy of the job may predate the message its first text made.
        key = _status_key(job) or _status_key(await self._engine.queue.get(job.id))
        if key is None:
            await self._post_status(job, text, markup)
        else:
            await self._edit(key, text, markup)

    async def _post_status(self, job: Job, text: str, markup: InlineKeyboardMarkup | None) -> None:
        """The first text of a job whose request had no "Checking" message: a new message, which later texts edit."""
        chat_id, reply = int(job.source.chat_id), job.source.reply
        request_id, thread_id = reply.get("request_message_id"), reply.get("thread_id")
        # Quoted in groups, where other people write in between, as message.reply_text does.
        quote = (
            ReplyParameters(int(request_id), allow_sending_without_reply=True) if chat_id < 0 and request_id else None
        )
        try:
            status = await self.app.bot.send_message(
                chat_id,
                chat.fit_text(text, TEXT_LIMIT),
                reply_markup=markup,
                reply_parameters=quote,
                message_thread_id=int(thread_id) if thread_id else None,
            )
        except RetryAfter as limit:
            raise chat.RetryLater(seconds(limit.retry_after)) from None
        await self._engine.queue.update_reply(job.id, status_message_id=str(status.message_id))

    async def _answer(
        self, request: Message, status_id: int | None, text: str, markup: InlineKeyboardMarkup | None = None
    ) -> None:
        """A request's answer: in its "Checking" message when it has one, else as a reply."""
        if status_id is None:
            await self._reply(request, text, markup)
        else:
            await self._edit((request.chat_id, status_id), text, markup)

    async def _reply(self, message: Message, text: str, markup: InlineKeyboardMarkup | None = None) -> Message:
        return await message.reply_text(chat.fit_text(text, TEXT_LIMIT), reply_markup=markup)

    async def _edit(self, key: tuple[int, int], text: str, markup: InlineKeyboardMarkup | None) -> None:
        chat_id, message_id = key
        try:
            await self.app.bot.edit_message_text(
                chat.fit_text(text, TEXT_LIMIT), chat_id=chat_id, message_id=message_id, reply_markup=markup
            )
        except RetryAfter as limit:
            raise chat.RetryLater(seconds(limit.retry_after)) from None
        except BadRequest as error:
            # "message is not modified" is harmless; a deleted message just stops getting updates.
            if "not modified" not in error.message.lower():
                log.warning("cannot edit message chat=%s: %s", chat_id, error.message)

    async def _send_video(self, job: Job) -> None:
        assert job.result is not None
        request_id = job.source.reply.get("request_message_id")
        thread_id = job.source.reply.get("thread_id")
        # A 413 leaves a lower limit in the job (so a restart keeps it): the refused file is never sent again.
        limit = self._config.upload_limit_bytes
        if "upload_limit" in job.source.reply:
            limit = min(limit, int(job.source.reply["upload_limit"]))
        sent_bytes = 0
        try:
            video = await asyncio.to_thread(fit_to_limit, Path(job.result.path), limit)
            sent_bytes = video.stat().st_size
            # Telegram answers once it has processed the upload: giving up sooner would send the video again.
            timeout = transfers.upload_timeout_s(sent_bytes, self._config.upload_limit_bytes)
            with video.open("rb") as payload:
                await self.app.bot.send_video(
                    int(job.source.chat_id),
                    payload,
                    caption=chat.result_caption(job),
                    width=job.result.width,
                    height=job.result.height,
                    duration=max(1, round(job.result.duration_s)),
                    supports_streaming=True,
                    reply_markup=_reroll_button(job.id),
                    reply_to_message_id=int(request_id) if request_id and request_id.isdigit() else None,
                    allow_sending_without_reply=True,
                    # Keeps the video in the request's forum topic even if the request was deleted meanwhile.
                    message_thread_id=int(thread_id) if thread_id else None,
                    filename=f"wanbot-{job.id}.mp4",
                    read_timeout=timeout,
                    write_timeout=timeout,
                )
        except (UserError, TelegramError, OSError) as error:
            if _answer_lost(error):
                # Telegram cannot be asked whether it posted the video; sending it again would most likely be a second.
                log.warning("no answer after the whole video of job=%s was sent; counted as delivered", job.id)
                return
            if _too_large(error):
                smaller = transfers.limit_after_413(sent_bytes)
                await self._engine.queue.update_reply(job.id, upload_limit=str(smaller))
                raise DeliveryFailed(
                    f"Telegram refused the {sent_bytes / 1e6:.1f} MB video as too large; "
                    f"the next try sends it re-encoded to {smaller / 1e6:.1f} MB"
                ) from error
            # Blocked by the user, removed from the group, or a video that cannot be made small enough: final.
            permanent = isinstance(error, Forbidden | UserError) or "chat not found" in str(error).lower()
            raise DeliveryFailed(str(error).replace(self._token, "<token>"), permanent) from error


def _worth_retrying(error: Exception) -> bool:
    """A picture download failure that may pass: a 5xx, a dropped or timed-out connection (not a bad file id)."""
    network = isinstance(error, NetworkError) and not isinstance(error, BadRequest)
    return network or transfers.retryable_http_error(error)


def _answer_lost(error: Exception) -> bool:
    """A read timeout: the whole upload went out, and Telegram did not answer in time."""
    return isinstance(error, TimedOut) and isinstance(error.__cause__, httpx.ReadTimeout)


def _too_large(error: Exception) -> bool:
    # python-telegram-bot turns a 413 into a NetworkError that keeps only Telegram's description.
    text = str(error).lower()
    return isinstance(error, NetworkError) and ("too large" in text or "too big" in text)


def _images_of(message: Message) -> list[ImageRef]:
    if message.photo:
        largest = message.photo[-1]
        return [ImageRef(largest.file_id, largest.file_size, None)]
    if message.document is not None:
        document = message.document
        return [ImageRef(document.file_id, document.file_size, document.file_name)]
    return []


def _command_name(message: Message) -> str:
    """ "/Video@wanbot a fox" -> "video"."""
    return message.text.split()[0].lstrip("/").split("@")[0].lower()


def _unknown_command_text(command: str) -> str:
    return f"I don't know {command}. /help lists what I can do."


def _is_private(message: Message) -> bool:
    return message.chat.type == "private"


def _reply_to(request: Message, status_message_id: int | None) -> dict[str, str]:
    """Where a job's progress and video go: its status message (if it has one yet), the request (and its forum
    topic, if any)."""
    reply = {"request_message_id": str(request.message_id)}
    if status_message_id is not None:
        reply["status_message_id"] = str(status_message_id)
    if request.is_topic_message and request.message_thread_id is not None:
        reply["thread_id"] = str(request.message_thread_id)
    return reply


def _status_key(job: Job) -> tuple[int, int] | None:
    message_id = job.source.reply.get("status_message_id")
    return (int(job.source.chat_id), int(message_id)) if message_id else None


def _cancel_button(job_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("Cancel", callback_data=f"cancel:{job_id}")]])


def _reroll_button(job_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("Reroll (new seed)", callback_data=f"reroll:{job_id}")]])
