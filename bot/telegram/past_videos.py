"""A user's past videos on Telegram, sent again without making them again: /history's buttons and inline mode
(`@bot words`). Telegram keeps a copy of every video the bot sent; its file id, recorded at delivery, sends it again
with no upload."""

from __future__ import annotations

import logging

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, InlineQuery, InlineQueryResultCachedVideo
from telegram.error import TelegramError

from bot.chat import texts
from bot.chat.core import ChatCore, Person
from engine.errors import UserError
from engine.jobs import Job
from engine.service import Engine

log = logging.getLogger(__name__)
# Where a job keeps Telegram's id of its sent video (JobSource.reply).
VIDEO_COPY = "video_file_id"
INLINE_CACHE_S = 10  # a new video shows up in inline results within seconds
ROW = 5  # /history's buttons a row


class PastVideos:
    def __init__(self, bot: Bot, core: ChatCore, engine: Engine, upload_limit_bytes: int) -> None:
        self._bot = bot
        self._core = core
        self._engine = engine
        self._upload_limit = upload_limit_bytes

    async def remember(self, job: Job, file_id: str) -> None:
        """Telegram's id of a delivered video; a failure to record it only costs an upload later (the delivery itself
        must not fail on it)."""
        try:
            await self._engine.update_reply(job.id, **{VIDEO_COPY: file_id})
        except Exception:
            log.warning("job=%s: Telegram's copy of its video was not recorded", job.id, exc_info=True)

    async def send(self, job: Job, chat_id: int, spoiler: bool, markup: InlineKeyboardMarkup) -> None:
        """`job`'s video sent to `chat_id` again: Telegram's copy when there is one, else the kept file, fitted."""
        where = {"caption": texts.result_caption(job), "has_spoiler": spoiler, "reply_markup": markup}
        try:
            if VIDEO_COPY in job.source.reply:
                await self._bot.send_video(chat_id, job.source.reply[VIDEO_COPY], **where)
                return
            made = await self._engine.video_file(job)
            if made is None:
                return
            video = await self._engine.fit_video(made, self._upload_limit)
            with video.open("rb") as payload:
                await self._bot.send_video(chat_id, payload, filename=f"wanbot-{job.id}.mp4", **where)
        except (TelegramError, UserError) as error:
            log.warning("job=%s could not be sent again to chat=%s: %s", job.id, chat_id, error)

    async def answer_inline(self, query: InlineQuery, person: Person) -> None:
        """@bot words, in any chat: the user's own videos whose prompt has those words, from Telegram's copies, to
        share there (only the user sees the list; nothing is made)."""
        jobs = await self._core.shareable(person, query.query, VIDEO_COPY)
        results = [
            InlineQueryResultCachedVideo(
                id=str(job.id),
                video_file_id=job.source.reply[VIDEO_COPY],
                title=f"#{job.id} {texts.fit_text(job.params.prompt, 60)}",
                description=f"{job.mode.value} · {job.result.duration_s:.1f} s" if job.result else job.mode.value,
                caption=texts.result_caption(job),
            )
            for job in jobs
        ]
        try:
            await query.answer(results, cache_time=INLINE_CACHE_S, is_personal=True)
        except TelegramError as error:  # the query is answered too late (10 s) or is gone: nothing to show then
            log.info("inline query not answered: %s", error)


def history_buttons(job_ids: list[int]) -> InlineKeyboardMarkup | None:
    """/history: a button per video, sending it again."""
    if not job_ids:
        return None
    buttons = [InlineKeyboardButton(f"#{job_id}", callback_data=f"again:{job_id}") for job_id in job_ids]
    return InlineKeyboardMarkup([buttons[index : index + ROW] for index in range(0, len(buttons), ROW)])
