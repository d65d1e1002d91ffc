"""Discord adapter (discord.py 2 app commands): /video with attachments (or /video-form, a form with uploads), live
progress, the video as a card with buttons that survive a restart, and delivery that outlives the 15-minute
interaction token by moving to channel messages (or, for a user who added the app to their own account and uses it
where the bot cannot post, to their DMs)."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import discord
from discord import app_commands

from bot.chat import texts, transfers
from bot.chat.core import NOT_ALLOWED, AccessPolicy, Answer, Ask, ChatCore, Person, Place, ids
from bot.chat.logredact import redact_everywhere, remove_redactor
from bot.chat.relay import JobRelay, TooLarge, UploadRefused
from bot.chat.texts import Buttons
from bot.discord import seams
from bot.discord.components import (
    CARD_TEXT_LIMIT,
    CONTENT_LIMIT,
    CancelButton,
    ExtendButton,
    OwnWordsButton,
    PictureVideoModal,
    RerollButton,
    SendAgainButton,
    VideoFormModal,
    adapter_of,
    answer_privately,
    buttons_view,
    result_card,
    video_file,
    video_name,
    view_of,
)
from bot.discord.inbox import InteractionInbox, PendingRequest
from engine.config import DiscordConfig, GenerationConfig
from engine.errors import Unavailable, UserError
from engine.jobs import DeliveryStatus, Job, JobStatus, PlaceKind
from engine.pipeline.models import MAX_PROMPT_CHARS, GenerationRequest
from engine.pipeline.presets import PRESET_HELP, Preset
from engine.service import Engine
from engine.storage.images import EXTENSIONS, SEND_SUPPORTED, Mode

log = logging.getLogger(__name__)

PLATFORM = "discord"
CONNECTION_TASK = "discord connection"
MAX_DESCRIPTION = 100  # characters in a slash command option's description
MAX_CHOICES = 25  # autocomplete suggestions Discord shows
UNKNOWN_CHANNEL = 10003  # Discord's JSON error code
INVALID_WEBHOOK_TOKEN = 50027  # Discord's code for an interaction token it no longer takes
# Follow-up messages Discord allows one interaction of an app that is not in its server; wanbot keeps every
# interaction within them, and sends what would come after as channel (or DM) messages.
FOLLOWUP_LIMIT = 5
LATER_BY_DM = (
    "I cannot post in this channel, so if your video is not ready within Discord's 15 minutes for an answer here, "
    "it will come to you by direct message."
)
# What the preset option's suggestions say about each preset (PRESET_HELP's trade-off, one preset a line).
PRESET_LINES = {
    Preset.FAST: "seconds to a minute, a little less motion",
    Preset.QUALITY: "the official settings, minutes",
}
# A re-sent video is looked for among this many of its channel's latest messages (one request's worth).
RECENT_MESSAGES_SEARCHED = 100
DISCORD_HELP = (
    "/video with a prompt: text to video (t2v); attach start_image for image to video (i2v), and end_image for the "
    "last frame.\n"
    "/video's fields set the mode and the options below; options written in the prompt work too, and a field wins.\n"
    "Or right-click a message with a picture > Apps > Make a video (two pictures: start and end frames)."
)


class WanbotClient(discord.Client):
    """A discord.py client that knows its adapter, so persistent buttons can reach it after a restart."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        # wanbot never joins a voice channel: discord.py's start-up warnings that PyNaCl and davey (voice
        # libraries) are missing would only worry an operator.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        super().__init__(**options)
        self.adapter = adapter
        # Every command works where the app is added to a server and where a user added it to their own account
        # (User Install), in servers, in the user's DM with the bot and in group DMs.
        self.tree = app_commands.CommandTree(
            self,
            allowed_installs=app_commands.AppInstallationType(guild=True, user=True),
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=True),
        )

    async def setup_hook(self) -> None:
        self.add_dynamic_items(CancelButton, RerollButton, ExtendButton, OwnWordsButton, SendAgainButton)
        await self.adapter.sync_commands()


@dataclass(frozen=True)
class DiscordPicture:
    """An attachment as the chat core downloads it (bot.chat.core.Picture)."""

    attachment: discord.Attachment

    @property
    def declared_size(self) -> int:
        return self.attachment.size

    @property
    def filename(self) -> str:
        return self.attachment.filename

    async def read(self, limit_bytes: int, label: str) -> bytes:
        return transfers.check_size(await self.attachment.read(), self.attachment.size)


class DiscordAdapter:
    def __init__(self, engine: Engine, config: DiscordConfig, clock: Any = time.time) -> None:
        if config.token is None:
            raise UserError("No Discord token is configured.", "Set discord.token or DISCORD_BOT_TOKEN.")
        seams.point_at(config.api_base_url, config.gateway_url)
        self._engine = engine
        self._config = config
        self._clock = clock
        self._redactor = redact_everywhere(config.token.get_secret_value())
        access = AccessPolicy(
            PLATFORM,
            admins=frozenset(engine.settings.access.admins),
            users=ids(config.allowed_users),
            chats=ids(config.allowed_channels),
            guilds=ids(config.allowed_guilds),
            roles=ids(config.allowed_roles),
        )
        self.core = ChatCore(engine, access, config.download_limit_bytes, _worth_retrying, DISCORD_HELP)
        # Only the guilds intent: it caches guild roles, so role allowlists work; no privileged intents are needed.
        # Prompts are echoed in captions: "@everyone" or "<@someone>" in one must not ping anybody but the owner.
        self.client = WanbotClient(
            self, intents=discord.Intents(guilds=True), allowed_mentions=discord.AllowedMentions.none()
        )
        self._relay = JobRelay(engine, PLATFORM, self._show, self._send_video, self._upload_limit, config)
        self._inbox = InteractionInbox(self.client, engine)
        self._finishing: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        for command in (*COMMANDS, video_command(engine.settings.generation)):
            self.client.tree.add_command(command)

    # -- life cycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        events = self._engine.subscribe()
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
            # Out of reach is temporary; a rejected token or a missing intent is the settings.
            unreachable = isinstance(error, OSError | TimeoutError | aiohttp.ClientError | discord.GatewayNotFound)
            raise (Unavailable if unreachable else UserError)(
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

    # -- requests ----------------------------------------------------------------------------------------------

    def _reply_for(self, interaction: discord.Interaction, received_at: float | None = None) -> dict[str, str]:
        """How the job answers: through the interaction while its token lives, with the upload limit it allows."""
        received = received_at if received_at is not None else self._clock()
        reply = {
            "application_id": str(interaction.application_id),
            "interaction_token": interaction.token,
            "token_expires_at": str(received + self._config.interaction_lifetime_s),
            "filesize_limit": str(interaction.filesize_limit or self._config.filesize_limit_bytes),
        }
        if not _bot_can_post(interaction):
            reply["later_by_dm"] = "1"
        return reply

    async def accept(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        start: discord.Attachment | None,
        end: discord.Attachment | None,
        notes: list[str],
    ) -> None:
        """Store the request, acknowledge it (Discord drops interactions not answered within 3 s), then submit."""
        if not self.core.allows(_person(interaction), _place(interaction)):
            await answer_privately(interaction, NOT_ALLOWED)
            return
        refusal = self.core.prompt_refusal(request.prompt)
        if refusal is not None:  # before the public "thinking...": only the requester reads why
            await answer_privately(interaction, refusal)
            return
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
        interaction = pending.interaction
        pictures = [attachment for attachment in (pending.start, pending.end) if attachment is not None]
        for attachment, role in zip(pictures, ("start", "end"), strict=False):
            if not _is_picture(attachment):
                kind = attachment.content_type or attachment.filename
                text = texts.user_error_text(
                    UserError(f"The {role} attachment ({kind}) is not a picture.", SEND_SUPPORTED)
                )
                await _edit_answer(interaction, Answer(text))
                return
        ask = Ask(
            _person(interaction),
            _place(interaction),
            str(interaction.id),
            self._reply_for(interaction, pending.received_at),
            lambda: texts.ParsedMessage(pending.request),
            [DiscordPicture(attachment) for attachment in pictures],
            pending.notes,
        )
        answer = await self.core.request(ask)
        if answer is not None:
            await _edit_answer(interaction, answer)

    # -- buttons -----------------------------------------------------------------------------------------------

    def lora_choices(self, interaction: discord.Interaction, typed: str) -> list[app_commands.Choice[str]]:
        """What the lora option suggests while a user types: the names of [loras] that contain the word being typed
        (after the last comma), at most Discord's 25; nothing for an outsider."""
        if not self.core.allows(_person(interaction), _place(interaction)):
            return []
        *before, last = typed.split(",")
        head = ", ".join(part.strip() for part in before if part.strip())
        word = last.strip().split(":")[0].lower()
        names = [name for name in self._engine.settings.loras if word in name][:MAX_CHOICES]
        choices = [f"{head}, {name}" if head else name for name in names]
        return [app_commands.Choice(name=choice, value=choice) for choice in choices]

    def preset_choices(self, interaction: discord.Interaction, typed: str) -> list[app_commands.Choice[str]]:
        """What the preset option suggests: each preset that matches what is typed, with its trade-off in a line;
        nothing for an outsider."""
        if not self.core.allows(_person(interaction), _place(interaction)):
            return []
        word = typed.strip().lower()
        return [
            app_commands.Choice(name=f"{preset.value}: {PRESET_LINES[preset]}", value=preset.value)
            for preset in Preset
            if word in preset.value or word in PRESET_LINES[preset]
        ]

    async def send_again(self, interaction: discord.Interaction, job_id: int) -> None:
        """A /history button: the video uploaded here again from the file the bot keeps, as the card it came in; a
        refusal to the presser alone."""
        job, refusal = await self.core.send_again(_person(interaction), _place(interaction), job_id)
        made = await self._engine.video_file(job) if job is not None else None
        if job is None or made is None:
            await answer_privately(interaction, refusal or f"Video #{job_id} is no longer kept.")
            return
        await interaction.response.defer(thinking=True)
        limit = interaction.filesize_limit or self._config.filesize_limit_bytes
        try:
            video = await self._engine.fit_video(made, limit)
        except UserError as error:
            await interaction.edit_original_response(content=texts.user_error_text(error))
            return
        spoiler = self._engine.video_policy(job, _place(interaction).kind) == "spoiler"
        file = video_file(job, await asyncio.to_thread(video.read_bytes), spoiler)
        caption = texts.result_caption(job, limit=CARD_TEXT_LIMIT - 30)
        await interaction.followup.send(file=file, view=result_card(job, caption, file), wait=True)

    async def on_own_words_button(self, interaction: discord.Interaction, job_id: int) -> None:
        said = await self.core.use_own_words(_person(interaction), _place(interaction), job_id)
        await answer_privately(interaction, said)

    async def on_cancel_button(self, interaction: discord.Interaction, job_id: int) -> None:
        text = await self.core.cancel(_person(interaction), _place(interaction), str(job_id))
        await answer_privately(interaction, text)

    async def on_reroll_button(self, interaction: discord.Interaction, job_id: int) -> None:
        await self.again(interaction, job_id, "reroll")

    async def again(
        self, interaction: discord.Interaction, job_id: int, action: str, prompt: str | None = None
    ) -> None:
        """Reroll or Extend (a button, or /extend): a refusal to the presser alone, else a new job whose place
        answers the interaction."""
        person, place, core = _person(interaction), _place(interaction), self.core
        async with core.reroll_turn(job_id):
            if action == "extend":
                refusal = await core.extend_refusal(person, place, job_id)
            else:
                refusal = await core.reroll_refusal(person, place, job_id)
            if refusal is not None:
                await answer_privately(interaction, refusal)
                return
            await interaction.response.defer(thinking=True)
            reply = self._reply_for(interaction)
            if action == "extend":
                answer = await core.extend(person, job_id, str(interaction.id), reply, prompt)
            else:
                answer = await core.reroll(person, job_id, str(interaction.id), reply)
        if answer is not None:
            await _edit_answer(interaction, answer)

    # -- outgoing ----------------------------------------------------------------------------------------------

    def _interaction_alive(self, job: Job) -> bool:
        return self._clock() < float(job.source.reply.get("token_expires_at", "0"))

    async def _later_channel(self, job: Job) -> discord.abc.Messageable:
        """Where the job's messages go once its interaction cannot carry them: its channel, or its owner's DM where
        the bot cannot post (discord.py keeps the DM channel once opened)."""
        if job.source.reply.get("later_by_dm"):
            return await self.client.create_dm(discord.Object(id=int(job.source.user_id)))
        return self.client.get_partial_messageable(int(job.source.chat_id))

    async def _take_followup(self, job: Job) -> Job | None:
        """`job` with one more of its interaction's follow-ups counted, before it is sent; None when the interaction
        has used all it may (each try counts: Discord may have taken one whose answer was lost)."""
        sent = int(job.source.reply.get("followups", "0"))
        if sent >= FOLLOWUP_LIMIT:
            return None
        return await self._engine.update_reply(job.id, followups=str(sent + 1))

    def _webhook(self, job: Job) -> discord.Webhook:
        reply = job.source.reply
        return discord.Webhook.partial(int(reply["application_id"]), reply["interaction_token"], client=self.client)

    async def _token_rejected(self, job: Job, error: discord.HTTPException) -> Job | None:
        """`job` moved to channel messages when Discord refuses its interaction token before its 15 minutes are up
        (revoked, or a clock ahead of ours), so no later message spends a request on it; None for other errors."""
        if error.status != 401 and error.code != INVALID_WEBHOOK_TOKEN:
            return None
        log.warning("Discord refused job=%s's interaction token early; its messages go to the channel", job.id)
        return await self._engine.update_reply(job.id, token_expires_at="0")

    async def _show(self, job: Job, text: str, buttons: Buttons, picture: bytes | None) -> None:
        """The job's live message: the interaction's answer while its token lives, then a channel message; a new
        preview replaces the picture attached to it."""
        alive = self._interaction_alive(job) and "progress_deleted" not in job.source.reply
        if not alive and job.status is JobStatus.QUEUED and not job.source.reply.get("channel_message_id"):
            # A new place in the queue is not worth a new message that mentions the user: the job's start makes one.
            return
        view = buttons_view(job.id, buttons)
        if alive and _may_come_by_dm(job):  # after a text fitted to leave it room, so it is never cut
            text = f"{texts.fit_text(text, CONTENT_LIMIT - texts.text_size(LATER_BY_DM) - 1)}\n{LATER_BY_DM}"
        try:
            if alive:
                content = texts.fit_text(text, CONTENT_LIMIT)
                attachments = _preview_files(picture) or discord.utils.MISSING
                await self._webhook(job).edit_message("@original", content=content, view=view, attachments=attachments)
            else:
                await self._show_in_channel(job, text, view, picture)
        except discord.NotFound:
            # The user (or a moderator) deleted the progress message: carry on in a new channel message.
            job = await self._engine.update_reply(job.id, progress_deleted="1", channel_message_id="")
            await self._show_in_channel(job, text, view, picture)
        except discord.HTTPException as error:
            moved = await self._token_rejected(job, error) if alive else None
            if moved is None:
                log.warning("cannot show progress job=%s: %s %s", job.id, error.status, error.text)
                return
            await self._show_in_channel(moved, text, view, picture)

    async def _show_in_channel(self, job: Job, text: str, view: discord.ui.View, picture: bytes | None) -> None:
        """The job's live message as a channel message that mentions its owner. Each request gets files of its own:
        a file already sent is read to its end."""
        channel = await self._later_channel(job)
        content = texts.fit_text(f"<@{job.source.user_id}> {text}", CONTENT_LIMIT)
        message_id = job.source.reply.get("channel_message_id")
        if message_id:
            try:
                await channel.get_partial_message(int(message_id)).edit(
                    content=content,
                    view=view,
                    allowed_mentions=_owner_only(job),
                    attachments=_preview_files(picture) or discord.utils.MISSING,
                )
                return
            except discord.NotFound:
                pass
        files = _preview_files(picture) or None
        message = await channel.send(content, view=view, allowed_mentions=_owner_only(job), files=files)
        await self._engine.update_reply(job.id, channel_message_id=str(message.id))

    def _upload_limit(self, job: Job) -> int:
        return int(job.source.reply.get("filesize_limit", self._config.filesize_limit_bytes))

    async def _send_video(self, job: Job, video: Path) -> None:
        # discord.py gives each request aiohttp's 5 minutes (not a few seconds): more than transfers.upload_timeout_s
        # asks for the largest upload Discord allows a bot (100 MiB), so a slow answer is not taken for a failure.
        spoiler = self._engine.video_policy(job) == "spoiler"
        if job.upload_starts > 1 and await self._posted_before(job, spoiler):
            return
        caption = f"<@{job.source.user_id}> {texts.result_caption(job, limit=CARD_TEXT_LIMIT - 30)}"
        data = await asyncio.to_thread(video.read_bytes)
        mentions = _owner_only(job)
        try:
            counted = await self._take_followup(job) if self._interaction_alive(job) else None
            if counted is not None:
                job = counted
                try:
                    file = video_file(job, data, spoiler)
                    card = result_card(job, caption, file)
                    await self._webhook(job).send(file=file, view=card, wait=True, allowed_mentions=mentions)
                    return
                except discord.HTTPException as error:
                    if await self._token_rejected(job, error) is None:
                        raise
            channel = await self._later_channel(job)
            # The same nonce on every try of this job: Discord answers a repeat of an upload whose answer was lost
            # with the message it already made. (An interaction's follow-up has no such check.)
            nonce = f"wanbot-{job.id}"
            file = video_file(job, data, spoiler)
            await channel.send(file=file, view=result_card(job, caption, file), allowed_mentions=mentions, nonce=nonce)
        except discord.HTTPException as error:
            if error.status == 413:
                raise TooLarge from error
            # No access to the channel, or the channel is gone: final.
            if isinstance(error, discord.Forbidden) or error.code == UNKNOWN_CHANNEL:
                raise UploadRefused(f"{type(error).__name__}: {error}") from error
            raise

    async def _posted_before(self, job: Job, spoiler: bool) -> bool:
        """Whether an earlier upload of `job`'s video, whose answer was lost, reached its channel after all: an
        interaction's follow-up has no nonce, so the bot's recent messages there are searched for its file name."""
        channel = await self._later_channel(job)
        me = self.client.user.id if self.client.user is not None else None
        try:
            async for message in channel.history(limit=RECENT_MESSAGES_SEARCHED):
                if message.author.id == me and any(
                    file.filename == video_name(job, spoiler) for file in message.attachments
                ):
                    log.info("job=%s's video is in its channel already (%s); not sent again", job.id, message.id)
                    return True
        except discord.HTTPException as error:
            # Without Read Message History it cannot be told: the video is sent again (at most two then).
            log.warning("cannot look for job=%s's earlier upload: %s %s", job.id, error.status, error.text)
        return False


# -- commands: each reaches the adapter through the interaction's client, as the persistent buttons do --------------


def video_command(limits: GenerationConfig) -> app_commands.Command[Any, ..., None]:
    """/video, with the step and frame ranges of the settings in force, so the client refuses what the bot would
    clamp (5 frames is the fewest Wan makes)."""

    @app_commands.command(name="video", description="Make a short video from text, or from a picture and text.")
    @app_commands.describe(
        prompt="What the video shows",
        mode="t2v: text only; i2v: from a start image; ti2v: text and image (5B model)",
        start_image="First frame (i2v, ti2v)",
        end_image="Last frame (optional)",
        negative_prompt="What to avoid (replaces Wan's default negative prompt)",
        seed="Same seed, same video",
        steps="Denoising steps (more: slower, finer)",
        frames="Number of frames (4k+1)",
        resolution="WIDTHxHEIGHT such as 832x480, or the model's preset: 480p or 720p (A14B), 720p (TI2V-5B)",
        guidance="How closely to follow the prompt",
        preset=PRESET_HELP[:MAX_DESCRIPTION],
        lora="A style or character: NAME or NAME:0.6, several joined by commas (/loras lists them)",
        enhance="Rewrite the prompt in detail first (default: the chat's /enhance setting)",
        loop="A video that returns to its first frame (t2v, or i2v from one picture)",
    )
    @app_commands.choices(mode=[app_commands.Choice(name=mode.value, value=mode.value) for mode in Mode])
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
        preset: str | None = None,
        lora: str | None = None,
        enhance: bool | None = None,
        loop: bool | None = None,
    ) -> None:
        # Options written in the prompt count, as in the "Make a video" form; a field the user filled in wins.
        try:
            parsed = texts.parse_message(prompt, None, has_image=start_image is not None)
            chosen_preset = _preset_field(preset) if preset else None
        except UserError as error:
            await answer_privately(interaction, texts.user_error_text(error))
            return
        fields = {
            "mode": Mode(mode) if mode else None,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "frames": frames,
            "resolution": resolution,
            "guidance": guidance,
            "preset": chosen_preset,
            "loras": [lora] if lora else None,
            "enhance": enhance,
            "loop": loop,
        }
        given = {name: value for name, value in fields.items() if value not in (None, "")}
        request = parsed.request.model_copy(update=given)
        await adapter_of(interaction).accept(interaction, request, start_image, end_image, parsed.notes)

    @video.autocomplete("lora")
    async def lora_choices(interaction: discord.Interaction, typed: str) -> list[app_commands.Choice[str]]:
        return adapter_of(interaction).lora_choices(interaction, typed)

    @video.autocomplete("preset")
    async def preset_choices(interaction: discord.Interaction, typed: str) -> list[app_commands.Choice[str]]:
        return adapter_of(interaction).preset_choices(interaction, typed)

    return video


@app_commands.command(name="enhance", description="Whether short prompts here are rewritten in detail first.")
@app_commands.describe(state="on or off (admins); leave it out to see how it is now")
@app_commands.choices(state=[app_commands.Choice(name=state, value=state) for state in ("on", "off")])
async def enhance_command(interaction: discord.Interaction, state: str | None = None) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, await core.enhance(_person(interaction), _place(interaction), state))


@app_commands.command(name="extend", description="Continue one of the bot's videos from its last frame.")
@app_commands.describe(job="The video's job number (its caption says it)", prompt="What happens next (default: same)")
async def extend_command(
    interaction: discord.Interaction, job: int, prompt: app_commands.Range[str, None, MAX_PROMPT_CHARS] = ""
) -> None:
    await adapter_of(interaction).again(interaction, job, "extend", prompt or None)


@app_commands.command(name="loras", description="The styles and characters a video may use (lora option).")
async def loras_command(interaction: discord.Interaction) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, core.loras_text(_person(interaction), _place(interaction)))


@app_commands.command(name="history", description="Your last 10 videos, to have one sent here again.")
async def history_command(interaction: discord.Interaction) -> None:
    text, job_ids = await adapter_of(interaction).core.history(_person(interaction), _place(interaction))
    view = view_of(*(SendAgainButton(job_id) for job_id in job_ids)) if job_ids else discord.utils.MISSING
    await interaction.response.send_message(texts.fit_text(text, CONTENT_LIMIT), view=view, ephemeral=True)


@app_commands.command(name="queue", description="Your jobs and their places in the queue.")
async def queue_command(interaction: discord.Interaction) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, await core.queue_text(_person(interaction), _place(interaction)))


@app_commands.command(name="cancel", description="Cancel a job (your latest if no number is given).")
async def cancel_command(interaction: discord.Interaction, job: int | None = None) -> None:
    core = adapter_of(interaction).core
    job_ref = str(job) if job is not None else None
    await answer_privately(interaction, await core.cancel(_person(interaction), _place(interaction), job_ref))


@app_commands.command(name="status", description="What the worker is doing.")
async def status_command(interaction: discord.Interaction) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, await core.status_text(_person(interaction), _place(interaction)))


# Shown only to members who may manage the server; wanbot's own admin list still decides.
@app_commands.command(name="pause", description="Admins: start no new videos (the running one finishes).")
@app_commands.default_permissions(manage_guild=True)
async def pause_command(interaction: discord.Interaction) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, await core.pause(_person(interaction), _place(interaction), paused=True))


@app_commands.command(name="resume", description="Admins: start queued videos again.")
@app_commands.default_permissions(manage_guild=True)
async def resume_command(interaction: discord.Interaction) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, await core.pause(_person(interaction), _place(interaction), paused=False))


@app_commands.command(name="previews", description="Admins: show the video taking shape while it is made, or not.")
@app_commands.describe(state="on or off; leave it out to see how it is now")
@app_commands.choices(state=[app_commands.Choice(name=state, value=state) for state in ("on", "off")])
async def previews_command(interaction: discord.Interaction, state: str | None = None) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, await core.previews(_person(interaction), _place(interaction), state))


@app_commands.command(name="help", description="How to use this bot.")
async def help_command(interaction: discord.Interaction) -> None:
    core = adapter_of(interaction).core
    await answer_privately(interaction, core.help_text(_person(interaction), _place(interaction)))


@app_commands.context_menu(name="Make a video")
async def make_video_command(interaction: discord.Interaction, message: discord.Message) -> None:
    """Right-click a message with pictures: a form asks for the prompt and the mode."""
    if not adapter_of(interaction).core.allows(_person(interaction), _place(interaction)):
        await answer_privately(interaction, NOT_ALLOWED)
        return
    pictures = [attachment for attachment in message.attachments if _is_picture(attachment)]
    if not pictures:
        await answer_privately(
            interaction,
            "That message has no picture to start from. Use it on a message with a picture attached, or /video for "
            "text to video.",
        )
        return
    # A modal must be the first answer, so it cannot wait behind a defer.
    await interaction.response.send_modal(PictureVideoModal(pictures))


@app_commands.command(name="video-form", description="Make a video by filling in a form.")
async def video_form_command(interaction: discord.Interaction) -> None:
    """/video as a form: the prompt, the mode, and the start and end pictures uploaded in it."""
    if not adapter_of(interaction).core.allows(_person(interaction), _place(interaction)):
        await answer_privately(interaction, NOT_ALLOWED)
        return
    await interaction.response.send_modal(VideoFormModal())


COMMANDS = (
    video_form_command,
    history_command,
    queue_command,
    cancel_command,
    status_command,
    pause_command,
    resume_command,
    previews_command,
    enhance_command,
    extend_command,
    loras_command,
    help_command,
    make_video_command,
)


def _person(interaction: discord.Interaction) -> Person:
    user = interaction.user
    roles = frozenset(str(role.id) for role in getattr(user, "roles", []))
    return Person(str(user.id), user.name, roles)


def _place(interaction: discord.Interaction) -> Place:
    guild = str(interaction.guild_id) if interaction.guild_id is not None else None
    if guild is None:
        # The user's DM with the bot is private; a group DM, or a DM between two users (where a user who added the app
        # to their account can use it), shows the video to others: the content rules count it as public.
        kind: PlaceKind = "public" if interaction.context.private_channel else "private"
    else:
        # A channel Discord marks age-restricted; a thread is as restricted as its parent.
        channel = interaction.channel
        parent = getattr(channel, "parent", None)
        nsfw = getattr(channel, "nsfw", False) or getattr(parent, "nsfw", False)
        kind = "age_restricted" if nsfw else "public"
    return Place(str(interaction.channel_id), guild, kind)


def _preset_field(typed: str) -> Preset | None:
    """The preset option: a suggestion, or a word typed past them, checked as preset= in a prompt is (a UserError
    that names the presets)."""
    return GenerationRequest.model_validate({"mode": Mode.T2V, "preset": typed}).preset


def _bot_can_post(interaction: discord.Interaction) -> bool:
    """Whether the bot may post messages of its own where `interaction` happened: in a server that added it, or in
    its DM with the user. A user who added the app to their own account can use it in other servers and group DMs,
    where only the interaction's own messages reach them."""
    return interaction.is_guild_integration() or interaction.context.dm_channel


def _may_come_by_dm(job: Job) -> bool:
    """Whether the job's video may still have to go to its owner's DM: the bot cannot post where it was asked, and
    the video has not arrived, failed or been cancelled."""
    finished = job.status in (JobStatus.FAILED, JobStatus.CANCELLED) or job.delivery_status in (
        DeliveryStatus.DELIVERED,
        DeliveryStatus.DELIVERY_FAILED,
    )
    return bool(job.source.reply.get("later_by_dm")) and not finished


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


async def _edit_answer(interaction: discord.Interaction, answer: Answer) -> None:
    """The deferred answer to a request: an error, or the place of a request already queued."""
    view = buttons_view(answer.job_id, answer.buttons) if answer.job_id is not None else discord.utils.MISSING
    await interaction.edit_original_response(content=texts.fit_text(answer.text, CONTENT_LIMIT), view=view)


def _preview_files(picture: bytes | None) -> list[discord.File]:
    """The preview as a new file to attach (none without a picture): a discord.File is read once."""
    return [discord.File(io.BytesIO(picture), filename="preview.jpg")] if picture is not None else []


def _owner_only(job: Job) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(id=int(job.source.user_id))])


def _is_picture(attachment: discord.Attachment) -> bool:
    """Any image type counts (the validator names the ones it cannot take), so nothing else is downloaded."""
    content_type = (attachment.content_type or "").split(";")[0]
    return content_type.startswith("image/") if content_type else Path(attachment.filename).suffix.lower() in EXTENSIONS
