"""Pictures in and videos out over a flaky or slow platform, with the real python-telegram-bot and discord.py
against the fake servers: each video arrives once, a 413 never sends the same file again, and a picture download
that fails on the way is tried again before the user gets an apology."""

from __future__ import annotations

import asyncio

import pytest

from bot.chat import texts, transfers
from engine.jobs import DeliveryStatus
from tests import fake_faults, imagefactory
from tests.discord import test_discord as on_discord
from tests.fake_discord import CHANNEL_ID
from tests.fake_telegram import FakeTelegram
from tests.running import until
from tests.telegram import test_telegram as on_telegram

ALICE = on_telegram.ALICE
pytestmark = pytest.mark.timeout(120)
# Longer than python-telegram-bot's default read timeout (5 s), which sent such an upload twice.
SLOW_ANSWER_S = 7.0


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfers, "DOWNLOAD_BACKOFF_S", 0.05)
    monkeypatch.setattr(fake_faults, "STALL_S", 3.0)


def videos_in(server: FakeTelegram, chat_id: int) -> list[dict]:
    return [message for message in server.replies(chat_id) if "video" in message]


# -- Telegram uploads ------------------------------------------------------------------------------------------


async def test_an_upload_telegram_answers_slowly_is_waited_for_and_sent_once(tiny_settings, telegram):
    telegram.delays["sendVideo"] = [SLOW_ANSWER_S]
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video a patient fox steps=2 frames=9")
        await until(lambda: on_telegram.status_of(telegram, ALICE, "the video is below"), what="delivery")
        await asyncio.sleep(1.0)  # two retry periods (delivery_retry_s 0.5): nothing may be sent again
        job = (await bot.engine._queue.list_jobs())[0]
    assert len(telegram.sent("sendVideo", ALICE)) == 1 and len(videos_in(telegram, ALICE)) == 1
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 1


async def test_an_upload_telegram_never_answers_counts_as_delivered_not_sent_again(
    tiny_settings, telegram, monkeypatch, caplog
):
    # The whole file went out; with no answer after the (here shrunk) wait, sending it again would make a second.
    monkeypatch.setattr(transfers, "UPLOAD_TIMEOUT_FLOOR_S", 1.0)
    telegram.delays["sendVideo"] = [3.0]
    caplog.set_level("WARNING", logger="bot.telegram.adapter")
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video a lost answer steps=2 frames=9")
        await until(lambda: on_telegram.status_of(telegram, ALICE, "the video is below"), what="delivery")
        await until(lambda: videos_in(telegram, ALICE), what="the fake to post the video it took in")
        await asyncio.sleep(1.0)
        job = (await bot.engine._queue.list_jobs())[0]
    assert len(telegram.sent("sendVideo", ALICE)) == 1 and len(videos_in(telegram, ALICE)) == 1
    assert job.delivery_status is DeliveryStatus.DELIVERED
    assert "counted as delivered" in caplog.text


async def test_a_413_sends_a_smaller_re_encoded_file_never_the_same_one_again(tiny_settings, telegram):
    telegram.faults["sendVideo"] = [(413, "Request Entity Too Large", None)]
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video noise steps=2 frames=33 res=128x128")
        await until(lambda: on_telegram.status_of(telegram, ALICE, "the video is below"), what="delivery")
        job = (await bot.engine._queue.list_jobs())[0]
    refused, sent = (call.files["video"] for call in telegram.sent("sendVideo", ALICE))
    assert len(refused) == job.result.bytes  # the first try sends the video as it was made
    assert len(sent) <= len(refused) * transfers.SMALLER_AFTER_413 and sent != refused
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 1  # retried at once
    assert job.source.reply["upload_limit"] == str(transfers.limit_after_413(len(refused)))  # survives a restart


def test_an_upload_may_take_its_size_over_a_slow_link_up_to_the_upload_limit():
    assert transfers.upload_timeout_s(0, 50_000_000) == 60.0
    assert transfers.upload_timeout_s(20_000_000, 50_000_000) == 80.0
    assert transfers.upload_timeout_s(3_000_000_000, 2_000_000_000) == 2060.0


# -- Telegram picture downloads --------------------------------------------------------------------------------


async def request_with_a_picture(bot, server: FakeTelegram) -> None:
    await bot.engine._queue.set_paused(True)  # only the queueing matters here
    server.photo(ALICE, imagefactory.jpeg(128, 96), caption="/i2v the waves roll in steps=2")


@pytest.mark.parametrize("fault", ["getFile 500", *fake_faults.FILE_FAULTS])
async def test_a_picture_download_that_fails_once_is_tried_again_and_queued(
    tiny_settings, telegram, monkeypatch, fault
):
    monkeypatch.setattr(transfers, "DOWNLOAD_TIMEOUT_FLOOR_S", 1.0)  # the "stall" try gives up after a second
    if fault == "getFile 500":
        telegram.faults["getFile"] = [(500, "Internal Server Error", None)]
    else:
        telegram.file_faults.append(fault)
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        await request_with_a_picture(bot, telegram)
        await until(lambda: on_telegram.status_of(telegram, ALICE, "is queued"), what="the queued job")
        jobs = await bot.engine._queue.list_jobs()
    assert len(jobs) == 1 and jobs[0].images[0].width == 128
    assert len(telegram.sent("getFile")) == 2
    assert len(telegram.downloads) == (1 if fault == "getFile 500" else 2)


async def test_a_picture_that_cannot_be_downloaded_three_times_gets_the_apology(tiny_settings, telegram, caplog):
    telegram.file_faults.extend(["truncated", "500", "short"])
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        await request_with_a_picture(bot, telegram)
        status = await until(lambda: on_telegram.status_of(telegram, ALICE, "Sorry"), what="the apology")
        assert await bot.engine._queue.counts() == {}
    assert status["text"] == texts.apology()
    assert len(telegram.downloads) == transfers.DOWNLOAD_TRIES
    assert sum("download of the start picture failed" in record.getMessage() for record in caplog.records) == 2


async def test_a_document_of_undeclared_size_is_read_only_up_to_the_download_limit(tiny_settings, telegram):
    settings = on_telegram.configure(tiny_settings, telegram, download_limit_bytes=50_000)
    async with on_telegram.running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)  # only the queueing matters here
        big = imagefactory.png(640, 480) + bytes(200_000)  # a picture with a long tail: 200 KB past the limit
        telegram.document(ALICE, big, "big.png", caption="/i2v too big to know", size=0)
        status = await until(lambda: on_telegram.status_of(telegram, ALICE, "larger than"), what="the refusal")
        fitting = imagefactory.png(160, 120)
        telegram.document(ALICE, fitting, "small.png", caption="/i2v small enough", size=0)
        await until(lambda: on_telegram.status_of(telegram, ALICE, "is queued"), what="the small one queued")
        jobs = await bot.engine._queue.list_jobs()
    assert status["text"].startswith("The start picture is larger than the 50 KB a bot may fetch.\nSend a smaller")
    assert [job.params.prompt for job in jobs] == ["small enough"]


# -- Discord ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "reset", "truncated", "short"])
async def test_an_attachment_download_that_fails_once_is_tried_again_and_queued(tiny_settings, discord_server, fault):
    discord_server.cdn_faults.append(fault)
    async with on_discord.running_bot(on_discord.configure(tiny_settings, discord_server)) as bot:
        await bot.engine._queue.set_paused(True)
        start = discord_server.attachment(imagefactory.png(160, 120), "start.png")
        interaction = await discord_server.slash(on_discord.ALICE, "video", {"prompt": "waves"}, {"start_image": start})
        await until(lambda: "is queued" in discord_server.original(interaction)["content"], what="the queued job")
        jobs = await bot.engine._queue.list_jobs()
    assert len(jobs) == 1 and jobs[0].images[0].width == 160
    assert len(discord_server.downloads) == 2


async def test_an_attachment_that_cannot_be_downloaded_three_times_gets_the_apology(tiny_settings, discord_server):
    discord_server.cdn_faults.extend(["500", "truncated", "500"])
    async with on_discord.running_bot(on_discord.configure(tiny_settings, discord_server)) as bot:
        start = discord_server.attachment(imagefactory.png(160, 120), "start.png")
        interaction = await discord_server.slash(on_discord.ALICE, "video", {"prompt": "waves"}, {"start_image": start})
        await until(lambda: "Sorry" in discord_server.original(interaction)["content"], what="the apology")
        assert await bot.engine._queue.counts() == {}
    assert discord_server.original(interaction)["content"] == texts.apology()
    assert len(discord_server.downloads) == transfers.DOWNLOAD_TRIES


@pytest.mark.parametrize("where", ["interaction", "channel"])
async def test_an_upload_whose_answer_is_lost_is_found_and_not_posted_twice(tiny_settings, discord_server, where):
    # An interaction's follow-up carries no nonce: before sending again, the bot looks for its earlier copy.
    lifetime = {"interaction": 900, "channel": 0.8}[where]
    settings = on_discord.configure(tiny_settings, discord_server, interaction_lifetime_s=lifetime)
    discord_server.lost_uploads = 1
    async with on_discord.running_bot(settings) as bot:
        if where == "channel":
            await on_discord.queued_until_the_tokens_expire(bot, discord_server, on_discord.ALICE)
        else:
            await discord_server.slash(on_discord.ALICE, "video", {"prompt": "waves"})
        await until(lambda: discord_server.calls_to("GET", f"channels/{CHANNEL_ID}/messages"), what="the search")
        job = await _delivered(bot, discord_server)
    uploads = [call for call in discord_server.calls if call.files and call.method == "POST"]
    assert len(uploads) == 1 and len(discord_server.with_files()) == 1
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 2 and job.upload_starts == 2


async def test_a_video_not_found_in_its_channel_is_sent_again(tiny_settings, discord_server):
    # The upload went nowhere (its connection dropped before Discord made the message): the search finds nothing.
    settings = on_discord.configure(tiny_settings, discord_server)
    discord_server.dropped_uploads = 1
    async with on_discord.running_bot(settings) as bot:
        await discord_server.slash(on_discord.ALICE, "video", {"prompt": "waves"})
        job = await _delivered(bot, discord_server)
    assert len(discord_server.calls_to("GET", f"channels/{CHANNEL_ID}/messages")) == 1
    assert len(discord_server.with_files()) == 1 and job.upload_starts == 2


async def test_without_read_message_history_the_video_is_sent_again(tiny_settings, discord_server, caplog):
    settings = on_discord.configure(tiny_settings, discord_server)
    discord_server.lost_uploads = 1
    discord_server.faults["GET channels/messages"] = [(403, {"message": "Missing Access", "code": 50001})]
    async with on_discord.running_bot(settings) as bot:
        await discord_server.slash(on_discord.ALICE, "video", {"prompt": "waves"})
        job = await _delivered(bot, discord_server)
    assert len(discord_server.with_files()) == 2  # the promise: at most two
    assert job.upload_starts == 2
    assert any("cannot look for job=1's earlier upload: 403" in record.getMessage() for record in caplog.records)


async def _delivered(bot, discord_server):
    """The job, once the chat says its video was delivered (which follows the delivery record)."""
    await until(
        lambda: any("the video is below" in m["content"] for m in discord_server.messages.values()),
        what="delivery",
    )
    return (await bot.engine._queue.list_jobs())[0]


async def test_discord_py_allows_an_upload_the_time_its_size_needs(tiny_settings, discord_server):
    # discord.py sets no timeout of its own: every request has aiohttp's session default, for uploads too.
    largest_bot_upload = 100 * 1024 * 1024
    async with on_discord.running_bot(on_discord.configure(tiny_settings, discord_server)) as bot:
        session = bot.adapter.client.http._HTTPClient__session
        assert session.timeout.total >= transfers.upload_timeout_s(largest_bot_upload, largest_bot_upload)
