"""Telegram adapter (python-telegram-bot 22): messages, photos, documents and albums in; one live progress message
per job and the finished video out. It only translates; the engine and bot/chat/texts.py hold the behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Opt in to python-telegram-bot's future time type now (RetryAfter.retry_after as a timedelta); _seconds takes both.
os.environ.setdefault("PTB_TIMEDELTA", "1")

import httpx
from telegram import (
    BotCommand,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    ReplyParameters,
    Update,
    User,
)
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    InlineQueryHandler,
    MessageHandler,
    filters,
)

from bot.chat import texts, transfers
from bot.chat.core import NOT_ALLOWED, AccessPolicy, Answer, Ask, ChatCore, Person, Place, ids
from bot.chat.inbox import ChatInbox
from bot.chat.logredact import redact_everywhere, remove_redactor
from bot.chat.relay import AnswerLost, JobRelay, TooLarge, UploadRefused
from bot.chat.texts import Buttons
from bot.telegram.past_videos import PastVideos, history_buttons
from bot.telegram.polling import DurablePolling, message_key, seconds
from bot.telegram.reactions import Reactions
from engine.config import TelegramConfig
from engine.errors import Unavailable, UserError
from engine.jobs import Job
from engine.service import Engine
from engine.storage.images import Mode

log = logging.getLogger(__name__)

PLATFORM = "telegram"
GROUP_REFRESH_LIMIT = 5
TEXT_LIMIT = 4096  # characters in a message
CAPTION_LIMIT = 1024  # characters in a photo's or video's caption (texts.result_caption's default)
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
BUTTON_ANSWER_LIMIT = 200  # characters in a button's answer

# What a press of Reroll or Extend answers at once, and the status message its new job's place replaces.
AGAIN = {
    "reroll": ("Making another one with a new seed…", "Rerolling job #{job}…"),
    "extend": ("Continuing the video from its last frame…", "Extending job #{job}…"),
}
EXTEND_HOW = "Reply /extend to one of my videos to continue it (/extend new prompt changes what happens next)."
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


@dataclass(frozen=True)
class TelegramPicture:
    """An ImageRef as the chat core downloads it (bot.chat.core.Picture)."""

    ref: ImageRef
    bot: Any

    @property
    def declared_size(self) -> int | None:
        return self.ref.file_size

    @property
    def filename(self) -> str | None:
        return self.ref.filename

    async def read(self, limit_bytes: int, label: str) -> bytes:
        # getFile again on each try: a file path Telegram handed out may be what stopped working.
        telegram_file = await self.bot.get_file(self.ref.file_id)
        declared = telegram_file.file_size or self.ref.file_size
        if declared is None:
            return await transfers.read_capped(telegram_file.file_path, limit_bytes, label)
        return transfers.check_size(bytes(await telegram_file.download_as_bytearray()), declared)


class TelegramAdapter:
    def __init__(self, engine: Engine, config: TelegramConfig, poll_timeout_s: float = 10.0) -> None:
        if config.token is None:
            raise UserError("No Telegram token is configured.", "Set telegram.token or TELEGRAM_BOT_TOKEN.")
        self._token = config.token.get_secret_value()
        self._engine = engine
        self._config = config
        self._poll_timeout_s = poll_timeout_s
        access = AccessPolicy(
            PLATFORM,
            admins=frozenset(engine.settings.access.admins),
            users=ids(config.allowed_users),
            chats=ids(config.allowed_chats),
        )
        self._core = ChatCore(engine, access, config.download_limit_bytes, _worth_retrying, TELEGRAM_HELP)
        # A group's 20 messages a minute are shared by every job in it: only its first few places are refreshed.
        self._relay = JobRelay(
            engine,
            PLATFORM,
            self._show,
            self._send_video,
            lambda job: config.upload_limit_bytes,
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
        self._reactions = Reactions(self.app.bot, config.reactions)
        self._past = PastVideos(self.app.bot, self._core, engine, config.upload_limit_bytes)
        self._inbox = ChatInbox(engine.database, PLATFORM)
        self._polling = DurablePolling(
            self.app.bot,
            engine,
            self.app.process_update,
            poll_timeout_s,
            allowed_updates=["message", "callback_query", "inline_query"],
            arrivals=self._core.arrivals,
            inbox=self._inbox,
        )
        self._add_handlers()

    # -- life cycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        events = self._engine.subscribe()
        try:
            await self._connect()
        except TelegramError as error:
            # A rejected token or an unreachable API: say so in one line, and leave nothing running behind.
            events.close()
            await self.stop()
            reason = str(error).replace(self._token, "<token>")
            # Out of reach (or timed out) is temporary; a rejected token is the settings.
            raise (Unavailable if isinstance(error, NetworkError) else UserError)(
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
                BotCommand("history", "Your last 10 videos, to have one sent here again"),
                BotCommand("extend", "Reply to one of my videos: continue it (/extend or /extend new prompt)"),
                BotCommand("loras", "The styles and characters to add with lora=NAME"),
                BotCommand("enhance", "Admins: /enhance on or off, short prompts rewritten in detail"),
                BotCommand("previews", "Admins: /previews on or off, the video taking shape while it is made"),
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
        self.app.add_handler(CommandHandler("previews", self._on_previews))
        self.app.add_handler(CommandHandler("loras", self._on_loras))
        self.app.add_handler(CommandHandler("enhance", self._on_enhance))
        self.app.add_handler(CommandHandler("extend", self._on_extend))
        self.app.add_handler(CommandHandler("history", self._on_history))
        self.app.add_handler(InlineQueryHandler(self._on_inline_query))
        self.app.add_handler(CommandHandler(["help", "start"], self._on_help))
        self.app.add_handler(CallbackQueryHandler(self._on_button, pattern=r"^(cancel|reroll|extend|own|again):\d+$"))
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
        elif _is_private(message) and self._answers(message):
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
        if self._answers(message):
            await self._reply(message, _unknown_command_text(message.text.split()[0]))

    async def _on_unusable(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if self._answers(update.effective_message):
            await update.effective_message.reply_text(UNUSABLE_HINT)

    def _answers(self, message: Message) -> bool:
        """Hints are for the people the bot serves; an outsider's stray picture, command or sticker gets silence
        (a command the bot knows still gets the refusal, so they learn why nothing happens)."""
        return message.from_user is not None and self._core.allows(_person(message.from_user), _place(message))

    async def _album_complete(self, key: tuple[int, str]) -> None:
        """Albums arrive as separate updates; once none has come for `album_wait_s`, treat them as one request."""
        # A newer picture of the album (or a stop) cancels this wait: the album stays open, and in the inbox.
        await asyncio.sleep(self._config.album_wait_s)
        self._album_timers.pop(key, None)
        messages = sorted(self._albums.pop(key, []), key=lambda item: item.message_id)
        try:
            await self._handle_album(messages)
        finally:
            for message in messages:
                self._core.arrivals.handled(str(message.chat_id), str(message.message_id))
            await self._polling.done(*self._album_updates.pop(key, []))

    async def _handle_album(self, messages: list[Message]) -> None:
        captioned = next((item for item in messages if self._caption_request(item) is not None), None)
        for item in messages:
            if item is not captioned:  # the request waits for the chat's earlier messages, not for its own pictures
                self._core.arrivals.handled(str(item.chat_id), str(item.message_id))
        if captioned is None:
            if messages and _is_private(messages[0]) and self._answers(messages[0]):
                await self._send_picture_hint(messages[0], [ref for item in messages for ref in _images_of(item)][:2])
            return
        mode, text = self._caption_request(captioned)
        images = [ref for item in messages for ref in _images_of(item)]
        notes = [texts.EXTRA_PICTURES_NOTE] if len(images) > 2 else []
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
            await self._reply(message, texts.user_error_text(error))
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
        person, place = _person(message.from_user), _place(message)
        if not self._core.allows(person, place):
            await self._reply(message, NOT_ALLOWED)
            return
        if await self._core.already_queued(person, place, str(message.message_id)):
            return  # Handled again after a restart, and already queued: its status message lives on.
        # Only a picture takes long enough (download, checks) to need a "Checking" message first. A text request's
        # first answer is its place, which the relay sends in event order: one message instead of two, which counts
        # when many users write at once and every message shares the bot's 30 a second.
        status_id = await self._status_message(message) if images else None
        ask = Ask(
            person,
            place,
            str(message.message_id),
            _reply_to(message, status_id),
            lambda: texts.parse_message(text, mode, has_image=bool(images)),
            [TelegramPicture(ref, self.app.bot) for ref in images],
            notes or [],
        )
        answer = await self._core.request(ask)
        if answer is not None:
            await self._answer(message, status_id, answer)

    async def _status_message(self, message: Message) -> int:
        """The "Checking" message of this request: the one a stopped process sent already, or a new one."""
        key = message_key(message.chat_id, message.message_id)
        sent = await self._inbox.reply(key)
        if sent is not None:
            return int(sent)
        status = await message.reply_text("Checking your request…")
        await self._inbox.set_reply(key, str(status.message_id))
        return status.message_id

    async def _on_queue(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        await self._reply(message, await self._core.queue_text(_person(update.effective_user), _place(message)))

    async def _on_cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, person = update.effective_message, _person(update.effective_user)
        job_ref = context.args[0] if context.args else None
        await self._reply(message, await self._core.cancel(person, _place(message), job_ref))

    async def _on_status(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        await self._reply(message, await self._core.status_text(_person(update.effective_user), _place(message)))

    async def _on_pause(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        paused = _command_name(message) == "pause"
        await self._reply(message, await self._core.pause(_person(update.effective_user), _place(message), paused))

    async def _on_previews(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, wanted = update.effective_message, context.args[0] if context.args else None
        await self._reply(message, await self._core.previews(_person(update.effective_user), _place(message), wanted))

    async def _on_enhance(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, wanted = update.effective_message, context.args[0] if context.args else None
        await self._reply(message, await self._core.enhance(_person(update.effective_user), _place(message), wanted))

    async def _on_loras(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        await self._reply(message, self._core.loras_text(_person(update.effective_user), _place(message)))

    async def _on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        await self._reply(message, self._core.help_text(_person(update.effective_user), _place(message)))

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Cancel, Reroll, Extend and Use my words: refusals and confirmations go to the presser alone, as the
        button's answer."""
        query = update.callback_query
        action, job_id = query.data.split(":")
        person, place = _person(query.from_user), _place(query.message)
        if action == "cancel":
            await query.answer(texts.fit_text(await self._core.cancel(person, place, job_id), BUTTON_ANSWER_LIMIT))
            return
        if action == "again":
            await self._send_again(query, person, place, int(job_id))
            return
        if action == "own":
            said = await self._core.use_own_words(person, place, int(job_id))
            await query.answer(texts.fit_text(said, BUTTON_ANSWER_LIMIT), show_alert=True)
            return
        async with self._core.reroll_turn(int(job_id)):
            refusal = await self._again_refusal(action, person, place, int(job_id))
            if refusal is not None:
                await query.answer(texts.fit_text(refusal, BUTTON_ANSWER_LIMIT), show_alert=True)
                return
            await query.answer(AGAIN[action][0])
            answer, status = await self._start_again(query.message, action, person, int(job_id), f"{action}-{query.id}")
        if answer is not None:
            await self._answer(query.message, status.message_id, answer)

    async def _on_history(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        text, job_ids = await self._core.history(_person(update.effective_user), _place(message))
        await self._reply(message, text, history_buttons(job_ids))

    async def _on_inline_query(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.inline_query
        await self._past.answer_inline(query, _person(query.from_user))

    async def _send_again(self, query: CallbackQuery, person: Person, place: Place, job_id: int) -> None:
        """A /history button: the video sent again where it was pressed, from Telegram's copy when it has one (no
        upload, no new generation)."""
        job, refusal = await self._core.send_again(person, place, job_id)
        if job is None or job.result is None:
            await query.answer(texts.fit_text(refusal, BUTTON_ANSWER_LIMIT), show_alert=True)
            return
        await query.answer(f"Sending #{job_id}...")
        spoiler = self._engine.video_policy(job, place.kind) == "spoiler"
        await self._past.send(job, query.message.chat_id, spoiler, _video_buttons(job.id))

    async def _on_extend(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/extend [prompt] as a reply to one of the bot's videos: the same as its Extend button, with a new prompt
        if one is given."""
        message = update.effective_message
        person, place = _person(update.effective_user), _place(message)
        job_id = _video_job(message.reply_to_message)
        if job_id is None:
            await self._reply(message, EXTEND_HOW if self._core.allows(person, place) else NOT_ALLOWED)
            return
        prompt = message.text.partition(" ")[2].strip() or None
        async with self._core.reroll_turn(job_id):
            refusal = await self._core.extend_refusal(person, place, job_id)
            if refusal is not None:
                await self._reply(message, refusal)
                return
            key = f"extend-{message.chat_id}-{message.message_id}"
            answer, status = await self._start_again(message, "extend", person, job_id, key, prompt)
        if answer is not None:
            await self._answer(message, status.message_id, answer)

    async def _again_refusal(self, action: str, person: Person, place: Place, job_id: int) -> str | None:
        if action == "extend":
            return await self._core.extend_refusal(person, place, job_id)
        return await self._core.reroll_refusal(person, place, job_id)

    async def _start_again(
        self, anchor: Message, action: str, person: Person, job_id: int, key: str, prompt: str | None = None
    ) -> tuple[Answer | None, Message]:
        """A reroll or an extend of `job_id`, answered in a status message replying to `anchor`."""
        status = await anchor.reply_text(AGAIN[action][1].format(job=job_id))
        reply = _reply_to(anchor, status.message_id)
        if action == "extend":
            return await self._core.extend(person, job_id, key, reply, prompt), status
        return await self._core.reroll(person, job_id, key, reply), status

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram handler failed: %s", type(context.error).__name__, exc_info=context.error)

    def _edit_interval(self, job: Job) -> float:
        # Group chats have negative ids; one progress message at the private pace would use up the group's budget.
        group = int(job.source.chat_id) < 0
        return self._config.group_edit_interval_s if group else self._config.edit_interval_s

    # -- outgoing ----------------------------------------------------------------------------------------------

    async def _show(self, job: Job, text: str, buttons: Buttons, picture: bytes | None) -> None:
        """A job's live message: a text message until its first preview, a photo with the text as its caption from
        then on (a text message cannot become a photo: the photo replaces it)."""
        markup = _waiting_buttons(job.id, buttons)
        # The relay's copy of the job may predate the message its first text (or picture) made, or its state.
        current = await self._engine.job(job.id)
        await self._reactions.show(current)
        reply = current.source.reply
        key = _status_key(job.source.chat_id, reply)
        photo = reply.get("status_kind") == "photo"
        with _edit_errors(f"job={job.id}"):
            if picture is not None and not photo:
                await self._post_status(job, text, markup, picture)
                if key is not None:
                    await self._delete(key)
            elif key is None:
                await self._post_status(job, text, markup)
            elif picture is not None:
                media = InputMediaPhoto(picture, caption=texts.fit_text(text, CAPTION_LIMIT))
                await self.app.bot.edit_message_media(media, chat_id=key[0], message_id=key[1], reply_markup=markup)
            elif photo:
                caption = texts.fit_text(text, CAPTION_LIMIT)
                await self.app.bot.edit_message_caption(key[0], key[1], caption=caption, reply_markup=markup)
            else:
                await self._edit(key, text, markup)

    async def _post_status(
        self, job: Job, text: str, markup: InlineKeyboardMarkup | None, picture: bytes | None = None
    ) -> None:
        """A job's new live message, which later texts edit: its first text when its request had no "Checking"
        message, or its first preview, as a photo captioned with the text."""
        chat_id, reply = int(job.source.chat_id), job.source.reply
        request_id, thread_id = reply.get("request_message_id"), reply.get("thread_id")
        # Quoted in groups, where other people write in between, as message.reply_text does.
        quote = (
            ReplyParameters(int(request_id), allow_sending_without_reply=True) if chat_id < 0 and request_id else None
        )
        where = {"reply_markup": markup, "reply_parameters": quote, "message_thread_id": _thread(thread_id)}
        if picture is None:
            status = await self.app.bot.send_message(chat_id, texts.fit_text(text, TEXT_LIMIT), **where)
            await self._engine.update_reply(job.id, status_message_id=str(status.message_id))
        else:
            caption = texts.fit_text(text, CAPTION_LIMIT)
            status = await self.app.bot.send_photo(chat_id, picture, caption=caption, **where)
            await self._engine.update_reply(job.id, status_message_id=str(status.message_id), status_kind="photo")

    async def _delete(self, key: tuple[int, int]) -> None:
        """Remove a live message a newer one replaced; one left behind only shows an older state."""
        try:
            await self.app.bot.delete_message(*key)
        except TelegramError as error:
            log.warning("could not delete a replaced message chat=%s: %s", key[0], error)

    async def _answer(self, request: Message, status_id: int | None, answer: Answer) -> None:
        """A request's answer: in its "Checking" message when it has one, else as a reply."""
        text = answer.text
        markup = _waiting_buttons(answer.job_id, answer.buttons) if answer.job_id is not None else None
        if status_id is None:
            await self._reply(request, text, markup)
        else:
            await self._edit((request.chat_id, status_id), text, markup)

    async def _reply(self, message: Message, text: str, markup: InlineKeyboardMarkup | None = None) -> Message:
        return await message.reply_text(texts.fit_text(text, TEXT_LIMIT), reply_markup=markup)

    async def _edit(self, key: tuple[int, int], text: str, markup: InlineKeyboardMarkup | None) -> None:
        chat_id, message_id = key
        with _edit_errors(f"chat={chat_id}"):
            await self.app.bot.edit_message_text(
                texts.fit_text(text, TEXT_LIMIT), chat_id=chat_id, message_id=message_id, reply_markup=markup
            )

    async def _send_video(self, job: Job, video: Path) -> None:
        assert job.result is not None
        request_id = job.source.reply.get("request_message_id")
        thread_id = job.source.reply.get("thread_id")
        # Telegram answers once it has processed the upload: giving up sooner would send the video again.
        size = (await asyncio.to_thread(video.stat)).st_size
        timeout = transfers.upload_timeout_s(size, self._config.upload_limit_bytes)
        cover = await self._engine.cover_picture(job)  # shown before the video plays, instead of its first frame
        try:
            with video.open("rb") as payload:
                sent = await self.app.bot.send_video(
                    int(job.source.chat_id),
                    payload,
                    caption=texts.result_caption(job),
                    width=job.result.width,
                    height=job.result.height,
                    duration=max(1, round(job.result.duration_s)),
                    supports_streaming=True,
                    reply_markup=_video_buttons(job.id),
                    reply_to_message_id=int(request_id) if request_id and request_id.isdigit() else None,
                    allow_sending_without_reply=True,
                    # Keeps the video in the request's forum topic even if the request was deleted meanwhile.
                    message_thread_id=_thread(thread_id),
                    filename=f"wanbot-{job.id}.mp4",
                    has_spoiler=self._engine.video_policy(job) == "spoiler",
                    cover=cover,
                    read_timeout=timeout,
                    write_timeout=timeout,
                )
        except RetryAfter as limit:
            raise texts.RetryLater(seconds(limit.retry_after)) from None
        except TelegramError as error:
            if _answer_lost(error):
                raise AnswerLost from error
            if _too_large(error):
                raise TooLarge from error
            # Blocked by the user, removed from the group, the chat gone: final.
            if isinstance(error, Forbidden) or "chat not found" in str(error).lower():
                raise UploadRefused(str(error).replace(self._token, "<token>")) from error
            raise
        if sent.video is not None:
            await self._past.remember(job, sent.video.file_id)


@contextlib.contextmanager
def _edit_errors(what: str) -> Iterator[None]:
    """A flood limit is waited out (texts.RetryLater); "message is not modified" is harmless; a deleted message just
    stops getting updates."""
    try:
        yield
    except RetryAfter as limit:
        raise texts.RetryLater(seconds(limit.retry_after)) from None
    except BadRequest as error:
        if "not modified" not in error.message.lower():
            log.warning("cannot update a message %s: %s", what, error.message)


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


def _person(user: User) -> Person:
    return Person(str(user.id), user.username or user.first_name or "")


def _place(message: Message) -> Place:
    return Place(str(message.chat_id), kind="private" if _is_private(message) else "public")


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


def _status_key(chat_id: str, reply: dict[str, str]) -> tuple[int, int] | None:
    message_id = reply.get("status_message_id")
    return (int(chat_id), int(message_id)) if message_id else None


def _thread(thread_id: str | None) -> int | None:
    return int(thread_id) if thread_id else None


def _waiting_buttons(job_id: int, buttons: Buttons) -> InlineKeyboardMarkup | None:
    if buttons == "none":
        return None
    row = [InlineKeyboardButton("Cancel", callback_data=f"cancel:{job_id}")]
    if buttons == "own_words":
        row.append(InlineKeyboardButton("Use my words", callback_data=f"own:{job_id}"))
    return InlineKeyboardMarkup([row])


def _video_buttons(job_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("Reroll (new seed)", callback_data=f"reroll:{job_id}"),
                InlineKeyboardButton("Extend", callback_data=f"extend:{job_id}"),
            ]
        ]
    )


def _video_job(message: Message | None) -> int | None:
    """The job whose video `message` is: its buttons name it (a message without them is no video of the bot's)."""
    markup = message.reply_markup if message is not None else None
    for row in markup.inline_keyboard if markup is not None else ():
        for button in row:
            action, _, job_id = str(button.callback_data or "").partition(":")
            if action in ("reroll", "extend") and job_id.isdigit():
                return int(job_id)
    return None
