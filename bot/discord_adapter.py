"""Discord adapter (discord.py 2 app commands): /video with attachments, live progress, buttons that survive a
restart, and delivery that outlives the 15-minute interaction token by moving to channel messages."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot import chat, transfers
from bot.discord_inbox import InteractionInbox, PendingRequest
from bot.logredact import redact_everywhere, remove_redactor
from bot.relay import Buttons, DeliveryFailed, JobRelay
from engine.config import DiscordConfig
from engine.errors import UserError
from engine.images import EXTENSIONS, SEND_SUPPORTED, Mode
from engine.jobs import Actor, EnqueueResult, Job, JobSource, JobStatus
from engine.models import MAX_PROMPT_CHARS, GenerationRequest
from engine.service import Engine, Upload
from engine.video import fit_to_limit

log = logging.getLogger(__name__)

PLATFORM = "discord"
CONNECTION_TASK = "discord connection"
CONTENT_LIMIT = 2000  # characters in a message; every text the bot sends is fitted to it (chat.fit_text)
MODAL_TIMEOUT_S = 900
UNKNOWN_CHANNEL = 10003  # Discord's JSON error code
NOT_ALLOWED = "Sorry, you are not allowed to use this bot here."
DISCORD_HELP = (
    "/video with a prompt: text to video (t2v); attach start_image for image to video (i2v), and end_image for the "
    "last frame.\n"
    "/video's fields set the mode and the options below; options written in the prompt work too, and a field wins.\n"
    "Or right-click a message with a picture > Apps > Make a video (two pictures: start and end frames)."
)


class WanbotClient(discord.Client):
    """A discord.py client that knows its adapter, so persistent buttons can reach it after a restart."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(CancelButton, RerollButton)
        await self.adapter.sync_commands()


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"wanbot:cancel:(?P<job_id>\d+)"):
    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(label="Cancel", style=discord.ButtonStyle.danger, custom_id=f"wanbot:cancel:{job_id}")
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any) -> Any:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.adapter.on_cancel_button(interaction, self.job_id)


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"wanbot:reroll:(?P<job_id>\d+)"):
    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Reroll (new seed)", style=discord.ButtonStyle.primary, custom_id=f"wanbot:reroll:{job_id}"
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any) -> Any:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.adapter.on_reroll_button(interaction, self.job_id)


class PictureVideoModal(discord.ui.Modal, title="Make a video from this picture"):
    """What the "Make a video" message command asks before it queues: the prompt (options allowed) and the mode."""

    def __init__(self, adapter: DiscordAdapter, pictures: list[discord.Attachment]) -> None:
        # A dismissed modal never reports back; the timeout is what removes it from discord.py's store.
        super().__init__(timeout=MODAL_TIMEOUT_S)
        self.adapter = adapter
        self.pictures = pictures
        self.prompt = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=MAX_PROMPT_CHARS,
            placeholder="the waves roll in (options work too: seed=7 steps=30 res=720p)",
        )
        self.mode = discord.ui.Select(
            options=[
                discord.SelectOption(label="i2v: image to video (A14B)", value=Mode.I2V.value, default=True),
                discord.SelectOption(label="ti2v: text and image to video (5B, faster)", value=Mode.TI2V.value),
            ],
            required=False,
        )
        self.add_item(discord.ui.Label(text="What happens in the video", component=self.prompt))
        self.add_item(discord.ui.Label(text="Mode", component=self.mode))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        mode = Mode(self.mode.values[0]) if self.mode.values else Mode.I2V
        await self.adapter.submit_picture_request(interaction, self.prompt.value, mode, self.pictures)


def _view(*items: discord.ui.Item[Any]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    return view


class DiscordAdapter:
    def __init__(self, engine: Engine, config: DiscordConfig, clock: Any = time.time) -> None:
        if config.token is None:
            raise UserError("No Discord token is configured.", "Set discord.token or DISCORD_BOT_TOKEN.")
        if config.api_base_url:
            Route.BASE = config.api_base_url.rstrip("/")
        if config.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(config.gateway_url)
        self._engine = engine
        self._config = config
        self._clock = clock
        self._redactor = redact_everywhere(config.token.get_secret_value())
        self._admins = frozenset(engine.settings.access.admins)
        # Only the guilds intent: it caches guild roles, so role allowlists work; no privileged intents are needed.
        # Prompts are echoed in captions: "@everyone" or "<@someone>" in one must not ping anybody but the owner.
        self.client = WanbotClient(
            self, intents=discord.Intents(guilds=True), allowed_mentions=discord.AllowedMentions.none()
        )
        self._relay = JobRelay(engine.queue, engine.supervisor, PLATFORM, self._show, self._send_video, config)
        self._inbox = InteractionInbox(self.client, engine.queue)
        self._finishing: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._register_commands()

    # -- life cycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        events = self._engine.queue.events.subscribe()
        self._runner = asyncio.create_task(self.client.start(self._config.token.get_secret_value()))
        ready = asyncio.create_task(self.client.wait_until_ready())
        await asyncio.wait({self._runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            # client.start() ended before READY: a bad token, an unreachable gateway, or a parser error.
            error = self._runner.exception() if not self._runner.cancelled() else None
            events.close()
            await self.stop()
            reason = f"{type(error).__name__}: {error}" if error else "stopped"
            raise UserError(
                f"Discord did not connect ({reason.replace(self._config.token.get_secret_value(), '<token>')}).",
                "Check discord.token, discord.api_base_url and the network.",
            ) from error
        self._relay.start(events)
        for pending in await self._inbox.unfinished():
            log.info(
                "finishing the request of interaction=%s, which the last run had not queued", pending.interaction.id
            )
            task = asyncio.create_task(self._submit_durably(pending))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
        # discord.py ends client.start() on a gateway parser error without a word: that must stop the process.
        self._engine.supervisor.watch(CONNECTION_TASK, self._runner)

    async def stop(self) -> None:
        await self._engine.supervisor.cancel(CONNECTION_TASK)
        for task in list(self._finishing):
            task.cancel()  # stays in the inbox: the next start finishes it
        await self._relay.stop()
        await self.client.close()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        remove_redactor(self._redactor)

    async def sync_commands(self) -> None:
        tree = self.client.tree
        if self._config.guild_ids:
            for guild_id in self._config.guild_ids:
                guild = discord.Object(id=guild_id)
                tree.copy_global_to(guild=guild)
                await tree.sync(guild=guild)
        else:
            await tree.sync()

    # -- commands ----------------------------------------------------------------------------------------------

    def _register_commands(self) -> None:
        tree = self.client.tree
        adapter = self
        limits = self._engine.settings.generation

        @tree.command(name="video", description="Make a short video from text, or from a picture and text.")
        @app_commands.describe(
            prompt="What the video shows",
            mode="t2v: text only; i2v: from a start image; ti2v: text and image (5B model)",
            start_image="First frame (i2v, ti2v)",
            end_image="Last frame (optional)",
            negative_prompt="What to avoid (replaces Wan's default negative prompt)",
            seed="Same seed, same video",
            steps="Denoising steps (more: slower, finer)",
            frames="Number of frames (4k+1)",
            resolution="480p, 720p or WIDTHxHEIGHT",
            guidance="How closely to follow the prompt",
        )
        @app_commands.choices(
            mode=[app_commands.Choice(name=mode.value, value=mode.value) for mode in Mode],
        )
        # The limits in force, so the client refuses what the bot would clamp (5 frames is the fewest Wan makes).
        @_annotate(
            steps=app_commands.Range[int, 1, limits.max_steps] | None,
            frames=app_commands.Range[int, 5, limits.max_frames] | None,
        )
        async def video(
            interaction: discord.Interaction,
            prompt: app_commands.Range[str, None, MAX_PROMPT_CHARS] = "",
            mode: str | None = None,
            start_image: discord.Attachment | None = None,
            end_image: discord.Attachment | None = None,
            negative_prompt: app_commands.Range[str, None, MAX_PROMPT_CHARS] = "",
            seed: app_commands.Range[int, 0, 2**32 - 1] | None = None,
            steps: int | None = None,
            frames: int | None = None,
            resolution: str | None = None,
            guidance: app_commands.Range[float, 0.0, 20.0] | None = None,
        ) -> None:
            # Options written in the prompt count, as in the "Make a video" form; a field the user filled in wins.
            try:
                parsed = chat.parse_message(prompt, None, has_image=start_image is not None)
            except UserError as error:
                await _answer_privately(interaction, chat.user_error_text(error))
                return
            fields = {
                "mode": Mode(mode) if mode else None,
                "negative_prompt": negative_prompt,
                "seed": seed,
                "steps": steps,
                "frames": frames,
                "resolution": resolution,
                "guidance": guidance,
            }
            given = {name: value for name, value in fields.items() if value not in (None, "")}
            request = parsed.request.model_copy(update=given)
            await adapter._accept(interaction, request, start_image, end_image, parsed.notes)

        @tree.command(name="queue", description="Your jobs and their places in the queue.")
        async def queue(interaction: discord.Interaction) -> None:
            text = await chat.queue_answer(adapter._engine.queue, f"{PLATFORM}:{interaction.user.id}")
            await _answer_privately(interaction, text)

        @tree.command(name="cancel", description="Cancel a job (your latest if no number is given).")
        async def cancel(interaction: discord.Interaction, job: int | None = None) -> None:
            try:
                if job is None:
                    job = await chat.latest_active_job(adapter._engine.queue, f"{PLATFORM}:{interaction.user.id}")
                cancelled = await adapter._engine.queue.cancel(job, adapter._actor(interaction))
                text = chat.cancel_text(cancelled)
            except UserError as error:
                text = chat.user_error_text(error)
            await _answer_privately(interaction, text)

        @tree.command(name="status", description="What the worker is doing.")
        async def status(interaction: discord.Interaction) -> None:
            await _answer_privately(interaction, await chat.status_answer(adapter._engine))

        async def pause_or_resume(interaction: discord.Interaction, paused: bool) -> None:
            try:
                text = await chat.pause_answer(adapter._engine.queue, adapter._actor(interaction), paused)
            except UserError as error:
                text = chat.user_error_text(error)
            await _answer_privately(interaction, text)

        # Shown only to members who may manage the server; wanbot's own admin list still decides.
        @tree.command(name="pause", description="Admins: start no new videos (the running one finishes).")
        @app_commands.default_permissions(manage_guild=True)
        async def pause(interaction: discord.Interaction) -> None:
            await pause_or_resume(interaction, paused=True)

        @tree.command(name="resume", description="Admins: start queued videos again.")
        @app_commands.default_permissions(manage_guild=True)
        async def resume(interaction: discord.Interaction) -> None:
            await pause_or_resume(interaction, paused=False)

        @tree.command(name="help", description="How to use this bot.")
        async def help_command(interaction: discord.Interaction) -> None:
            await interaction.response.send_message(chat.help_text(DISCORD_HELP), ephemeral=True)

        @tree.context_menu(name="Make a video")
        async def make_video(interaction: discord.Interaction, message: discord.Message) -> None:
            if not adapter._allowed(interaction):
                await interaction.response.send_message(NOT_ALLOWED, ephemeral=True)
                return
            pictures = [attachment for attachment in message.attachments if _is_picture(attachment)]
            if not pictures:
                await interaction.response.send_message(
                    "That message has no picture to start from. Use it on a message with a picture attached, or "
                    "/video for text to video.",
                    ephemeral=True,
                )
                return
            # A modal must be the first answer, so it cannot wait behind a defer.
            await interaction.response.send_modal(PictureVideoModal(adapter, pictures))

    def _actor(self, interaction: discord.Interaction) -> Actor:
        user_id = str(interaction.user.id)
        return Actor(platform=PLATFORM, user_id=user_id, is_admin=f"{PLATFORM}:{user_id}" in self._admins)

    def _reply_for(self, interaction: discord.Interaction, received_at: float | None = None) -> dict[str, str]:
        """How the job answers: through the interaction while its token lives, with the upload limit it allows."""
        received = received_at if received_at is not None else self._clock()
        return {
            "application_id": str(interaction.application_id),
            "interaction_token": interaction.token,
            "token_expires_at": str(received + self._config.interaction_lifetime_s),
            "filesize_limit": str(interaction.filesize_limit or self._config.filesize_limit_bytes),
        }

    def _allowed(self, interaction: discord.Interaction) -> bool:
        config = self._config
        if self._actor(interaction).is_admin:
            return True
        roles = {role.id for role in getattr(interaction.user, "roles", [])}
        checks = [
            not config.allowed_guilds or interaction.guild_id in config.allowed_guilds,
            not config.allowed_channels or interaction.channel_id in config.allowed_channels,
            not config.allowed_users or interaction.user.id in config.allowed_users,
            not config.allowed_roles or bool(roles & set(config.allowed_roles)),
        ]
        return all(checks)

    async def submit_picture_request(
        self, interaction: discord.Interaction, text: str, mode: Mode, pictures: list[discord.Attachment]
    ) -> None:
        """A request from the "Make a video" message command: its text is read like a Telegram caption."""
        try:
            parsed = chat.parse_message(text, mode, has_image=True)
        except UserError as error:
            await interaction.response.defer(thinking=True)
            await _edit_answer(interaction, chat.user_error_text(error))
            return
        notes = [*([chat.EXTRA_PICTURES_NOTE] if len(pictures) > 2 else []), *parsed.notes]
        end = pictures[1] if len(pictures) > 1 else None
        await self._accept(interaction, parsed.request, pictures[0], end, notes)

    async def _accept(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        start: discord.Attachment | None,
        end: discord.Attachment | None,
        notes: list[str],
    ) -> None:
        """Store the request, acknowledge it (Discord drops interactions not answered within 3 s), then submit."""
        pending = PendingRequest(interaction, request, start, end, notes, received_at=self._clock())
        await self._inbox.remember(pending)
        await interaction.response.defer(thinking=True)
        await self._submit_durably(pending)

    async def _submit_durably(self, pending: PendingRequest) -> None:
        """Submit, then take the request out of the inbox; a process stopping before that leaves it there."""
        interaction = pending.interaction
        try:
            await self._submit(pending)
        except Exception:
            log.exception("request failed interaction=%s", interaction.id)
        try:
            await self._inbox.done(interaction)
        except Exception:
            # Only means it is handled once more (harmlessly: the job is found by its interaction) at the next start.
            log.warning("could not mark interaction=%s handled", interaction.id, exc_info=True)

    async def _submit(self, pending: PendingRequest) -> None:
        interaction, start, end = pending.interaction, pending.start, pending.end
        if not self._allowed(interaction):
            await interaction.edit_original_response(content=NOT_ALLOWED)
            return
        source = JobSource(
            platform=PLATFORM,
            chat_id=str(interaction.channel_id),
            user_id=str(interaction.user.id),
            user_name=interaction.user.name,
            message_id=str(interaction.id),
            reply=self._reply_for(interaction, pending.received_at),
        )
        try:
            if start is not None or end is not None:
                await self._engine.check_room(source)  # the limits before any download or decode
            uploads = [await self._download(attachment, role) for attachment, role in ((start, "start"), (end, "end"))]
            submission = await self._engine.submit(pending.request, source, uploads[0], uploads[1], notes=pending.notes)
        except UserError as error:
            await _edit_answer(interaction, chat.user_error_text(error))
            return
        except Exception:
            log.exception("request failed channel=%s user=%s", interaction.channel_id, interaction.user.id)
            await _edit_answer(interaction, chat.apology())
            return
        await self._show_duplicate(interaction, submission.result)

    async def _show_duplicate(self, interaction: discord.Interaction, result: EnqueueResult) -> None:
        """A new job's place is shown by the relay, in event order; a request already queued is answered here."""
        if not result.created:
            paused = await self._engine.queue.is_paused()
            text = chat.queued_text(result.job, result.position, duplicate=True, paused=paused)
            await _edit_answer(interaction, text, _view(CancelButton(result.job.id)))

    async def _download(self, attachment: discord.Attachment | None, role: str) -> Upload | None:
        if attachment is None:
            return None
        limit = self._config.download_limit_bytes
        if attachment.size > limit:
            raise UserError(
                f"The {role} image is {attachment.size / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB.",
                "Send a smaller or more compressed picture.",
            )
        if not _is_picture(attachment):
            kind = attachment.content_type or attachment.filename
            raise UserError(f"The {role} attachment ({kind}) is not a picture.", SEND_SUPPORTED)

        async def fetch() -> bytes:
            return transfers.check_size(await attachment.read(), attachment.size)

        data = await transfers.download(fetch, _worth_retrying, attachment.size, f"the {role} picture")
        return Upload(data, attachment.filename)

    # -- buttons -----------------------------------------------------------------------------------------------

    async def on_cancel_button(self, interaction: discord.Interaction, job_id: int) -> None:
        try:
            text = chat.cancel_text(await self._engine.queue.cancel(job_id, self._actor(interaction)))
        except UserError as error:
            text = chat.user_error_text(error)
        await _answer_privately(interaction, text)

    async def on_reroll_button(self, interaction: discord.Interaction, job_id: int) -> None:
        await interaction.response.defer(thinking=True)
        old = await self._engine.queue.get(job_id)
        source = old.source.model_copy(
            update={
                "user_id": str(interaction.user.id),
                "message_id": str(interaction.id),
                "reply": self._reply_for(interaction),
            }
        )
        try:
            result = await self._engine.reroll(job_id, self._actor(interaction), source)
        except UserError as error:
            await _edit_answer(interaction, chat.user_error_text(error))
            return
        await self._show_duplicate(interaction, result)

    # -- outgoing ----------------------------------------------------------------------------------------------

    def _interaction_alive(self, job: Job) -> bool:
        return self._clock() < float(job.source.reply.get("token_expires_at", "0"))

    def _webhook(self, job: Job) -> discord.Webhook:
        reply = job.source.reply
        return discord.Webhook.partial(int(reply["application_id"]), reply["interaction_token"], client=self.client)

    async def _show(self, job: Job, text: str, buttons: Buttons) -> None:
        alive = self._interaction_alive(job) and "progress_deleted" not in job.source.reply
        if not alive and job.status is JobStatus.QUEUED and not job.source.reply.get("channel_message_id"):
            # A new place in the queue is not worth a new message that mentions the user: the job's start makes one.
            return
        view = _view(CancelButton(job.id)) if buttons == "cancel" else discord.ui.View(timeout=None)
        try:
            if alive:
                content = chat.fit_text(text, CONTENT_LIMIT)
                await self._webhook(job).edit_message("@original", content=content, view=view)
            else:
                await self._show_in_channel(job, text, view)
        except discord.NotFound:
            # The user (or a moderator) deleted the progress message: carry on in a new channel message.
            job = await self._engine.queue.update_reply(job.id, progress_deleted="1", channel_message_id="")
            await self._show_in_channel(job, text, view)
        except discord.HTTPException as error:
            log.warning("cannot show progress job=%s: %s %s", job.id, error.status, error.text)

    async def _show_in_channel(self, job: Job, text: str, view: discord.ui.View) -> None:
        channel = self.client.get_partial_messageable(int(job.source.chat_id))
        content = chat.fit_text(f"<@{job.source.user_id}> {text}", CONTENT_LIMIT)
        message_id = job.source.reply.get("channel_message_id")
        if message_id:
            try:
                await channel.get_partial_message(int(message_id)).edit(
                    content=content, view=view, allowed_mentions=_owner_only(job)
                )
                return
            except discord.NotFound:
                pass
        message = await channel.send(content, view=view, allowed_mentions=_owner_only(job))
        await self._engine.queue.update_reply(job.id, channel_message_id=str(message.id))

    async def _send_video(self, job: Job) -> None:
        assert job.result is not None
        limit = int(job.source.reply.get("filesize_limit", self._config.filesize_limit_bytes))
        source = Path(job.result.path)
        try:
            video = await asyncio.to_thread(fit_to_limit, source, limit)
            try:
                await self._upload(job, video)
            except discord.HTTPException as error:
                if error.status != 413:
                    raise
                # The channel's limit is lower than the interaction said: one more try, well under the refused file.
                smaller = transfers.limit_after_413(video.stat().st_size)
                await self._upload(job, await asyncio.to_thread(fit_to_limit, source, smaller))
        except (UserError, discord.HTTPException, OSError) as error:
            # No access to the channel, the channel is gone, or still too large after re-encoding: final.
            permanent = isinstance(error, UserError | discord.Forbidden) or (
                isinstance(error, discord.HTTPException) and (error.status == 413 or error.code == UNKNOWN_CHANNEL)
            )
            raise DeliveryFailed(f"{type(error).__name__}: {error}", permanent) from error

    async def _upload(self, job: Job, video: Path) -> None:
        # discord.py gives each request aiohttp's 5 minutes (not a few seconds): more than transfers.upload_timeout_s
        # asks for the largest upload Discord allows a bot (100 MiB), so a slow answer is not taken for a failure.
        content = f"<@{job.source.user_id}> {chat.result_caption(job, limit=CONTENT_LIMIT - 30)}"
        file = discord.File(io.BytesIO(await asyncio.to_thread(video.read_bytes)), filename=f"wanbot-{job.id}.mp4")
        view = _view(RerollButton(job.id))
        mentions = _owner_only(job)
        if self._interaction_alive(job):
            await self._webhook(job).send(content=content, file=file, view=view, wait=True, allowed_mentions=mentions)
        else:
            channel = self.client.get_partial_messageable(int(job.source.chat_id))
            # The same nonce on every try of this job: Discord answers a repeat of an upload whose answer was lost
            # with the message it already made. (An interaction's follow-up has no such check.)
            nonce = f"wanbot-{job.id}"
            await channel.send(content, file=file, view=view, allowed_mentions=mentions, nonce=nonce)


def _annotate(**annotations: Any) -> Any:
    """Set a command's option types at registration: the module's annotations are strings that discord.py
    resolves in the module's namespace, which knows no settings."""

    def apply(callback: Any) -> Any:
        callback.__annotations__.update(annotations)
        return callback

    return apply


def _worth_retrying(error: Exception) -> bool:
    """A CDN failure that may pass: a 5xx, or a reset, cut-short or timed-out connection (not a 404 or 403)."""
    if isinstance(error, discord.HTTPException):
        return error.status >= 500
    return isinstance(error, aiohttp.ClientError | OSError)


async def _answer_privately(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(chat.fit_text(text, CONTENT_LIMIT), ephemeral=True)


async def _edit_answer(
    interaction: discord.Interaction, text: str, view: discord.ui.View = discord.utils.MISSING
) -> None:
    """The deferred answer to a command: an error, or the place of a request already queued."""
    await interaction.edit_original_response(content=chat.fit_text(text, CONTENT_LIMIT), view=view)


def _owner_only(job: Job) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(id=int(job.source.user_id))])


def _is_picture(attachment: discord.Attachment) -> bool:
    """Any image type counts (the validator names the ones it cannot take), so nothing else is downloaded."""
    content_type = (attachment.content_type or "").split(";")[0]
    return content_type.startswith("image/") if content_type else Path(attachment.filename).suffix.lower() in EXTENSIONS
