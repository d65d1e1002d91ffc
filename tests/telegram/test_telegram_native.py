"""Telegram's own ways of showing a job: reactions on the request as a silent status, where the chat allows them,
and the video's cover (its last frame) shown before it plays."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot.chat.core import NOT_ALLOWED
from bot.telegram.reactions import CANCELLED, MAKING, SENT, WAITING
from tests.running import until
from tests.telegram.test_telegram import ALICE, BOB, configure, running_bot

pytestmark = pytest.mark.timeout(120)
GROUP = -100777
CAROL = 333


async def test_the_request_shows_the_jobs_state_as_a_reaction_and_the_video_has_its_last_frame_as_cover(
    tiny_settings, telegram
):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        await bot.engine.set_paused(True)
        request = telegram.command(ALICE, "/video a fox steps=2")
        await until(lambda: telegram.reactions.get((ALICE, request["message_id"])), what="the waiting reaction")
        await bot.engine.set_paused(False)
        [video] = await until(lambda: telegram.sent("sendVideo", ALICE), what="the video")
        key = (ALICE, request["message_id"])
        await until(lambda: telegram.reactions.get(key, [])[-1:] == [SENT], what="the last reaction")
        [job] = await bot.engine._queue.list_jobs()
    shown = telegram.reactions[key]
    assert shown[0] == WAITING and MAKING in shown and shown[-1] == SENT
    assert len(shown) == len(set(shown))  # each state once: no reaction repeated on every progress edit
    cover = Image.open(io.BytesIO(video.files[video.fields["cover"].removeprefix("attach://")]))
    assert cover.format == "JPEG" and cover.size == (job.result.width, job.result.height)


async def test_a_chat_without_reactions_gets_none_after_its_first_refusal_and_the_job_goes_on(tiny_settings, telegram):
    telegram.no_reactions.add(GROUP)
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(ALICE, "/video a fox steps=2", chat_id=GROUP, chat_type="supergroup")
        await until(lambda: telegram.replies(GROUP), what="the place")
        telegram.command(ALICE, "/cancel", chat_id=GROUP, chat_type="supergroup")
        await until(lambda: any("cancelled" in reply.get("text", "") for reply in telegram.replies(GROUP)), what="end")
        private = telegram.command(ALICE, "/video a hare steps=2")
        await until(lambda: telegram.reactions.get((ALICE, private["message_id"])), what="a reaction in private")
        telegram.command(ALICE, "/cancel")
        await until(lambda: CANCELLED in telegram.reactions.get((ALICE, private["message_id"]), []), what="cancel")
    tried = [
        call for call in telegram.calls if call.method == "setMessageReaction" and int(call.fields["chat_id"]) == GROUP
    ]
    assert len(tried) == 1  # refused once (reactions off in that group), never asked again


async def test_history_lists_your_videos_and_sends_one_again_from_telegrams_copy(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram, allowed_users=[ALICE, BOB])) as bot:
        request = telegram.command(ALICE, "/video a fox steps=2")
        await until(lambda: _shows(telegram, request, SENT), what="the video, its copy recorded")
        [job] = await bot.engine._queue.list_jobs()
        telegram.command(ALICE, "/history")
        listed = await until(lambda: _reply_with(telegram, ALICE, "Your last videos"), what="/history")
        telegram.press(ALICE, listed, f"again:{job.id}")
        videos = await until(lambda: telegram.sent("sendVideo", ALICE)[1:], what="the video again")
        telegram.press(BOB, listed, f"again:{job.id}")  # someone else's video: refused, nothing sent
        refusal = await until(
            lambda: [
                call for call in telegram.sent("answerCallbackQuery") if "not yours" in call.fields.get("text", "")
            ],
            what="the refusal",
        )
        telegram.command(CAROL, "/history")  # an outsider
        outsider = await until(lambda: telegram.replies(CAROL), what="the outsider's answer")
        assert len(await bot.engine._queue.list_jobs()) == 1  # sent again, never made again
        copy = (await bot.engine.job(job.id)).source.reply["video_file_id"]
    assert f"#{job.id} t2v" in listed["text"] and "a fox" in listed["text"]
    assert videos[0].fields["video"] == copy and not videos[0].files  # Telegram's copy: no upload
    assert len(telegram.sent("sendVideo")) == 2 and refusal
    assert outsider[0]["text"] == NOT_ALLOWED


def _reply_with(telegram, chat_id: int, start: str) -> dict | None:
    return next((reply for reply in telegram.replies(chat_id) if reply.get("text", "").startswith(start)), None)


async def test_inline_mode_offers_your_own_videos_whose_prompt_has_the_words_typed(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram, allowed_users=[ALICE, BOB])) as bot:
        request = telegram.command(ALICE, "/video a red fox steps=2")
        await until(lambda: _shows(telegram, request, SENT), what="the video, its copy recorded")
        [job] = await bot.engine._queue.list_jobs()
        asked = {who: telegram.inline(who, words) for who, words in ((ALICE, "Fox"), (BOB, "fox"), (CAROL, ""))}
        hare = telegram.inline(ALICE, "hare")
        await until(lambda: all(query in telegram.inline_answers for query in [*asked.values(), hare]), what="answers")
        copy = (await bot.engine.job(job.id)).source.reply["video_file_id"]
    [offered] = telegram.inline_answers[asked[ALICE]]
    assert (
        offered["type"] == "video" and offered["video_file_id"] == copy and offered["title"].startswith(f"#{job.id} ")
    )
    assert telegram.inline_answers[asked[BOB]] == []  # only your own videos
    assert telegram.inline_answers[asked[CAROL]] == []  # an outsider gets nothing
    assert telegram.inline_answers[hare] == []


def _shows(telegram, request: dict, reaction: str) -> bool:
    """Whether the request's latest reaction is `reaction` (🎉: the video is sent and its delivery recorded)."""
    return telegram.reactions.get((request["chat"]["id"], request["message_id"]), [])[-1:] == [reaction]
