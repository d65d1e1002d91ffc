"""The guard that a rewrite keeps what the user named, and the enhancer's answers around it: off, empty prompts,
a rewrite that lost a word, and a failure nobody foresaw."""

from __future__ import annotations

import logging

import pytest

from engine.config import PromptsConfig
from engine.enhance.enhancer import MAX_CHARS, Enhanced, Enhancer
from engine.enhance.failures import TOO_LONG, UNAVAILABLE
from engine.enhance.guard import missing_words, with_user_words
from engine.hub.downloads import Downloader
from tests.enhance.conftest import Sleeps
from tests.enhance.fake_openai import FakeOpenAI


def test_a_rewrite_that_keeps_every_key_word_loses_nothing():
    original = "Whiskers, a ginger cat, chases 3 red balloons"
    rewrite = "A fluffy GINGER cat named Whiskers chases 3 bright red balloons across a sunny meadow."
    assert missing_words(original, rewrite, "keep") == []


def test_names_numbers_and_long_words_must_survive_but_short_and_common_words_need_not():
    original = "Please make a video of Whiskers with 3 red balloons"
    rewrite = "A cat chases 30 crimson balloons through a park."
    # "red" is too short to check, "please", "make", "video" and "with" are common words, "30" is not "3".
    assert missing_words(original, rewrite, "keep") == ["Whiskers", "3"]


def test_a_key_word_is_matched_ignoring_case_and_inside_longer_words():
    assert missing_words("Dragon flies", "Two dragons fly over a castle.", "keep") == ["flies"]
    assert missing_words("ÉLÉPHANT rose", "Un éléphant rose danse.", "keep") == []


def test_in_english_mode_only_numbers_are_checked():
    original = "un chat roux avec 2 chapeaux"
    assert missing_words(original, "A ginger cat wearing two hats.", "english") == ["2"]
    assert missing_words(original, "A ginger cat wearing 2 hats.", "english") == []


def test_scripts_written_without_spaces_are_not_checked_word_by_word():
    assert missing_words("一只橘猫在雨中散步 3 次", "一只橘色的猫在雨夜的街道上慢慢走了3次。", "keep") == []


def test_the_users_prompt_goes_in_front_of_a_rewrite_that_lost_a_word():
    # In front: the text encoder reads 512 tokens and cuts the end, which must be the added detail.
    assert (
        with_user_words("  Whiskers the cat ", "A ginger cat in the rain.")
        == "Whiskers the cat A ginger cat in the rain."
    )


async def test_the_enhancer_puts_the_users_words_in_front_when_the_rewrite_dropped_a_name(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
):
    openai.content = "A ginger cat walks slowly through a rainy street at night."
    subject = Enhancer(PromptsConfig(enhancer="openai", enhancer_url=openai.url), downloader, sleep=sleeps)

    with caplog.at_level(logging.INFO, logger="engine.enhance"):
        result = await subject.enhance("Whiskers walking in rain", "t2v")
    await subject.close()

    assert result == Enhanced(f"Whiskers walking in rain {openai.content}", "Whiskers walking in rain", enhanced=True)
    assert "left out ['Whiskers', 'walking']" in caplog.text


async def test_when_the_users_words_in_front_would_be_too_long_the_users_words_alone_are_used(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps
):
    openai.content = "x" * (MAX_CHARS - 10)
    subject = Enhancer(PromptsConfig(enhancer="openai", enhancer_url=openai.url), downloader, sleep=sleeps)

    result = await subject.enhance("Whiskers in the rain", "t2v")
    await subject.close()

    assert result == Enhanced("Whiskers in the rain", "Whiskers in the rain", enhanced=False, note=TOO_LONG)


async def test_off_gives_the_users_words_without_a_note(downloader: Downloader):
    subject = Enhancer(PromptsConfig(), downloader)

    await subject.load()
    assert await subject.enhance("a cat", "t2v") == Enhanced("a cat", "a cat", enhanced=False, note=None)
    assert subject.describe() == "prompt enhancer: off"
    await subject.close()


async def test_an_empty_prompt_is_not_sent(openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps):
    subject = Enhancer(PromptsConfig(enhancer="openai", enhancer_url=openai.url), downloader, sleep=sleeps)

    assert await subject.enhance("  ", "i2v") == Enhanced("  ", "  ", enhanced=False)
    await subject.close()

    assert openai.requests == []


async def test_an_unknown_mode_is_a_mistake_of_the_caller(downloader: Downloader):
    with pytest.raises(ValueError, match="mode must be one of t2v, i2v, ti2v"):
        await Enhancer(PromptsConfig(), downloader).enhance("a cat", "video")


async def test_a_failure_nobody_foresaw_still_ends_in_the_users_words(
    downloader: Downloader, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    subject = Enhancer(PromptsConfig(enhancer="openai", enhancer_url="http://127.0.0.1:9/v1"), downloader)

    async def broken(system: str, user: str) -> str:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(subject._backend, "complete", broken)
    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance("a cat", "t2v")

    assert result == Enhanced("a cat", "a cat", enhanced=False, note=UNAVAILABLE)
    assert "illegal memory access" in caplog.text
