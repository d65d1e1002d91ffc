"""Telegram's own ways of showing a job: reactions on the request as a silent status, where the chat allows them,
and the video's cover (its last frame) shown before it plays."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot.telegram.reactions import CANCELLED, MAKING, SENT, WAITING
from tests.running import until
from tests.telegram.test_telegram import ALICE, configure, running_bot

pytestmark = pytest.mark.timeout(120)
GROUP = -100777


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
