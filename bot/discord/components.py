"""The bot's Discord components: the buttons about a job, which survive a restart (their custom id names the job),
the two forms (the "Make a video" message command's and /video-form), and a delivered video's card. Each hands what
the user did to the adapter of the client it came to (bot/discord/adapter.py), which does the rest."""

from __future__ import annotations

import io
from typing import Any

import discord

from bot.chat import texts
from bot.chat.texts import Buttons
from engine.errors import UserError
from engine.jobs import Job
from engine.pipeline.models import MAX_PROMPT_CHARS
from engine.storage.images import Mode

CONTENT_LIMIT = 2000  # characters in a message; every text the bot sends is fitted to it (texts.fit_text)
CARD_TEXT_LIMIT = 4000  # characters of text in a Components V2 message (discord.ui.LayoutView.content_length)
MODE_LABELS = {
    Mode.T2V: "t2v: text to video",
    Mode.I2V: "i2v: image to video (A14B)",
    Mode.TI2V: "ti2v: text and image to video (5B, faster)",
}
MODAL_TIMEOUT_S = 900


def adapter_of(interaction: discord.Interaction) -> Any:
    """The DiscordAdapter of the client an interaction came to (WanbotClient.adapter)."""
    return interaction.client.adapter


class _JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"wanbot:[a-z]+:(?P<job_id>\d+)"):
    """A button about one job that survives a restart: its custom id is `wanbot:<ACTION>:<job id>`. (Never
    registered itself: each kind below matches its own action.)"""

    ACTION: str
    LABEL: str
    STYLE: discord.ButtonStyle

    def __init__(self, job_id: int) -> None:
        custom_id = f"wanbot:{self.ACTION}:{job_id}"
        super().__init__(discord.ui.Button(label=self.LABEL, style=self.STYLE, custom_id=custom_id))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any) -> Any:
        return cls(int(match["job_id"]))


class CancelButton(_JobButton, template=r"wanbot:cancel:(?P<job_id>\d+)"):
    ACTION, LABEL, STYLE = "cancel", "Cancel", discord.ButtonStyle.danger

    async def callback(self, interaction: discord.Interaction) -> None:
        await adapter_of(interaction).on_cancel_button(interaction, self.job_id)


class SendAgainButton(_JobButton, template=r"wanbot:again:(?P<job_id>\d+)"):
    """/history: one of the user's videos, sent here again (no new generation)."""

    ACTION, LABEL, STYLE = "again", "", discord.ButtonStyle.secondary

    def __init__(self, job_id: int) -> None:
        super().__init__(job_id)
        self.item.label = f"#{job_id}"

    async def callback(self, interaction: discord.Interaction) -> None:
        await adapter_of(interaction).send_again(interaction, self.job_id)


class RerollButton(_JobButton, template=r"wanbot:reroll:(?P<job_id>\d+)"):
    ACTION, LABEL, STYLE = "reroll", "Reroll (new seed)", discord.ButtonStyle.primary

    async def callback(self, interaction: discord.Interaction) -> None:
        await adapter_of(interaction).on_reroll_button(interaction, self.job_id)


class ExtendButton(_JobButton, template=r"wanbot:extend:(?P<job_id>\d+)"):
    """Under a delivered video: continue it from its last frame."""

    ACTION, LABEL, STYLE = "extend", "Extend", discord.ButtonStyle.secondary

    async def callback(self, interaction: discord.Interaction) -> None:
        await adapter_of(interaction).again(interaction, self.job_id, "extend")


class OwnWordsButton(_JobButton, template=r"wanbot:own:(?P<job_id>\d+)"):
    """Under a waiting job whose prompt the enhancer rewrote: make it from its owner's own words instead."""

    ACTION, LABEL, STYLE = "own", "Use my words", discord.ButtonStyle.secondary

    async def callback(self, interaction: discord.Interaction) -> None:
        await adapter_of(interaction).on_own_words_button(interaction, self.job_id)


class PictureVideoModal(discord.ui.Modal, title="Make a video from this picture"):
    """What the "Make a video" message command asks before it queues: the prompt (options allowed) and the mode."""

    def __init__(self, pictures: list[discord.Attachment]) -> None:
        # A dismissed modal never reports back; the timeout is what removes it from discord.py's store.
        super().__init__(timeout=MODAL_TIMEOUT_S)
        self.pictures = pictures
        self.prompt = _prompt_field("the waves roll in")
        self.mode = _mode_field([Mode.I2V, Mode.TI2V], default=Mode.I2V)
        self.add_item(discord.ui.Label(text="What happens in the video", component=self.prompt))
        self.add_item(discord.ui.Label(text="Mode", component=self.mode))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        """The form's text is read like a Telegram caption."""
        mode = Mode(self.mode.values[0]) if self.mode.values else Mode.I2V
        try:
            parsed = texts.parse_message(self.prompt.value, mode, has_image=True)
        except UserError as error:
            await answer_privately(interaction, texts.user_error_text(error))
            return
        notes = [*([texts.EXTRA_PICTURES_NOTE] if len(self.pictures) > 2 else []), *parsed.notes]
        end = self.pictures[1] if len(self.pictures) > 1 else None
        await adapter_of(interaction).accept(interaction, parsed.request, self.pictures[0], end, notes)


class VideoFormModal(discord.ui.Modal, title="Make a video"):
    """/video-form: /video as a form, for users who prefer one: the prompt (options allowed), the mode and the start
    and end pictures, uploaded in the form."""

    def __init__(self) -> None:
        # A dismissed modal never reports back; the timeout is what removes it from discord.py's store.
        super().__init__(timeout=MODAL_TIMEOUT_S)
        self.prompt = _prompt_field("a red fox runs through snow")
        self.mode = _mode_field(list(Mode), placeholder="t2v without a picture, i2v with one")
        self.start = discord.ui.FileUpload(required=False, max_values=1)
        self.end = discord.ui.FileUpload(required=False, max_values=1)
        self.add_item(discord.ui.Label(text="What happens in the video", component=self.prompt))
        self.add_item(discord.ui.Label(text="Mode", component=self.mode))
        self.add_item(
            discord.ui.Label(text="Start picture", description="First frame (i2v, ti2v)", component=self.start)
        )
        self.add_item(discord.ui.Label(text="End picture", description="Last frame (optional)", component=self.end))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        """The form's text is read as /video's prompt is; its pictures are /video's attachments."""
        start = self.start.values[0] if self.start.values else None
        end = self.end.values[0] if self.end.values else None
        mode = Mode(self.mode.values[0]) if self.mode.values else None
        try:
            parsed = texts.parse_message(self.prompt.value, mode, has_image=start is not None)
        except UserError as error:
            await answer_privately(interaction, texts.user_error_text(error))
            return
        await adapter_of(interaction).accept(interaction, parsed.request, start, end, parsed.notes)


def _prompt_field(example: str) -> discord.ui.TextInput[Any]:
    return discord.ui.TextInput(
        style=discord.TextStyle.paragraph,
        required=False,
        max_length=MAX_PROMPT_CHARS,
        placeholder=f"{example} (options work too: seed=7 steps=30 size=832x480)",
    )


def _mode_field(
    modes: list[Mode], default: Mode | None = None, placeholder: str | None = None
) -> discord.ui.Select[Any]:
    options = [
        discord.SelectOption(label=MODE_LABELS[mode], value=mode.value, default=mode is default) for mode in modes
    ]
    return discord.ui.Select(placeholder=placeholder, options=options, required=False)


def view_of(*items: discord.ui.Item[Any]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    return view


def buttons_view(job_id: int, buttons: Buttons) -> discord.ui.View:
    """A waiting or running job's buttons (an empty view takes them off a message)."""
    if buttons == "none":
        return discord.ui.View(timeout=None)
    own = [OwnWordsButton(job_id)] if buttons == "own_words" else []
    return view_of(CancelButton(job_id), *own)


async def answer_privately(interaction: discord.Interaction, text: str) -> None:
    """An answer only the user who asked sees."""
    await interaction.response.send_message(texts.fit_text(text, CONTENT_LIMIT), ephemeral=True)


def video_name(job: Job, spoiler: bool) -> str:
    """The video's file name, which also marks it as this job's among the bot's messages; Discord hides a file whose
    name starts with SPOILER_ until it is clicked (the content rules' spoiler policy)."""
    return f"{'SPOILER_' if spoiler else ''}wanbot-{job.id}.mp4"


def result_card(job: Job, caption: str, video: discord.File) -> discord.ui.LayoutView:
    """A delivered video as a Components V2 card: the video, played in place, its prompt and settings, and Reroll and
    Extend. It always fits Discord's limits: the caption is fitted to the card's text limit, and it uses 6 of the 40
    components a message may have."""
    card = discord.ui.LayoutView(timeout=None)
    card.add_item(
        discord.ui.Container(
            discord.ui.MediaGallery(discord.MediaGalleryItem(video)),  # the attachment, hidden if it is a spoiler
            discord.ui.TextDisplay(caption),
            discord.ui.ActionRow(RerollButton(job.id), ExtendButton(job.id)),
        )
    )
    return card


def video_file(job: Job, data: bytes, spoiler: bool) -> discord.File:
    return discord.File(io.BytesIO(data), filename=video_name(job, spoiler))
