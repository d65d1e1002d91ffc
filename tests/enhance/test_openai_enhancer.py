"""The enhancer on an OpenAI-compatible endpoint: what it sends, what it makes of the answers, and how every failure
ends in the user's own words, a sentence for them and a line for the operator."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import PromptsConfig
from engine.enhance.enhancer import MAX_CHARS, Enhanced, Enhancer
from engine.enhance.failures import EMPTY, NOT_IN_TIME, TOO_LONG, UNAVAILABLE, UNUSABLE
from engine.enhance.instructions import system_prompt
from engine.hub.downloads import Downloader
from tests.enhance.conftest import Sleeps
from tests.enhance.fake_openai import FakeOpenAI

PROMPT = "a ginger cat in the rain"


def enhancer(server: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, **overrides: object) -> Enhancer:
    values = {"enhancer": "openai", "enhancer_url": server.url, "enhancer_model": "qwen2.5-7b", **overrides}
    return Enhancer(PromptsConfig.model_validate(values), downloader, sleep=sleeps)


async def test_the_endpoint_gets_the_instructions_the_prompt_the_model_and_the_key(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TEST_ENHANCER_KEY", "sk-test-123")
    subject = enhancer(openai, downloader, sleeps, enhancer_key_env="TEST_ENHANCER_KEY", enhancer_max_new_tokens=150)

    result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result == Enhanced(openai.content, PROMPT, enhanced=True, note=None)
    [request] = openai.requests
    assert request.messages == {"system": system_prompt("keep", pictured=False), "user": PROMPT}
    assert request.body["model"] == "qwen2.5-7b"
    assert request.body["max_tokens"] == 150
    assert request.body["temperature"] == 0
    assert request.headers["Authorization"] == "Bearer sk-test-123"
    assert sleeps == []


async def test_without_a_key_no_authorization_is_sent_and_without_a_model_the_servers_own_is_used(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_ENHANCER_KEY", raising=False)
    subject = enhancer(openai, downloader, sleeps, enhancer_model="")

    assert (await subject.enhance(PROMPT, "t2v")).enhanced
    await subject.close()

    [request] = openai.requests
    assert "Authorization" not in request.headers
    assert "model" not in request.body
    assert "no key ($WANBOT_ENHANCER_KEY unset)" in subject.describe()


@pytest.mark.parametrize(
    ("mode", "has_image", "pictured"),
    [("t2v", False, False), ("i2v", False, True), ("ti2v", False, False), ("ti2v", True, True)],
)
async def test_with_a_start_picture_the_instructions_ask_for_motion_and_camera(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, mode: str, has_image: bool, pictured: bool
):
    subject = enhancer(openai, downloader, sleeps, enhancer_language="english")

    await subject.enhance(PROMPT, mode, has_image=has_image)
    await subject.close()

    system = openai.requests[0].messages["system"]
    assert system == system_prompt("english", pictured=pictured)
    assert ("Describe mainly the motion" in system) is pictured
    assert "Write in English" in system


@pytest.mark.parametrize("fault", ["500", "503", "429"])
async def test_a_server_error_or_429_is_tried_again_after_a_backoff(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, fault: str
):
    openai.faults = [fault]
    subject = enhancer(openai, downloader, sleeps)

    result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result.enhanced and result.prompt == openai.content and result.note is None
    assert len(openai.requests) == 2
    assert len(sleeps) == 1


async def test_the_backoff_doubles_and_the_tries_end_in_the_users_words_and_a_log_line(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
):
    openai.faults = ["500"] * 4
    subject = enhancer(openai, downloader, sleeps, enhancer_retries=3)

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=UNAVAILABLE)
    assert len(openai.requests) == 4
    # 0.5 s, 1 s, 2 s, each with jitter of +-50%.
    assert [0.25 <= wait / 2**attempt <= 0.75 for attempt, wait in enumerate(sleeps)] == [True] * 3
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"{openai.url}/chat/completions answered HTTP 500" in record.getMessage()
    assert "after 4 tries" in record.getMessage()


async def test_a_refusal_is_not_tried_again(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
):
    openai.faults = ["401"]
    subject = enhancer(openai, downloader, sleeps)

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=UNAVAILABLE)
    assert len(openai.requests) == 1 and sleeps == []
    assert "answered HTTP 401: " in caplog.text and "fake 401" in caplog.text


async def test_no_answer_in_time_is_tried_again_then_the_user_is_told(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
):
    openai.faults = ["slow", "slow"]
    subject = enhancer(openai, downloader, sleeps, enhancer_timeout_s=0.2, enhancer_retries=1)

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=NOT_IN_TIME)
    assert len(openai.requests) == 2
    assert f"no answer from {openai.url}/chat/completions within 0.2 s" in caplog.text


async def test_an_endpoint_that_cannot_be_reached_is_tried_again_then_the_user_is_told(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
):
    subject = enhancer(openai, downloader, sleeps)
    await openai.stop()

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=UNAVAILABLE)
    assert len(sleeps) == 2
    assert "could not be reached (ClientConnectorError" in caplog.text


@pytest.mark.parametrize("fault", ["bad json", "no choices"])
async def test_an_answer_that_is_no_chat_completion_is_not_used(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, caplog: pytest.LogCaptureFixture, fault: str
):
    openai.faults = [fault]
    subject = enhancer(openai, downloader, sleeps)

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=UNUSABLE)
    assert len(openai.requests) == 1
    assert "not JSON" in caplog.text or "without choices[0].message.content" in caplog.text


@pytest.mark.parametrize(
    ("content", "note"),
    [
        ("", EMPTY),
        ("  \n<think>a ginger cat?</think>\n ", EMPTY),
        ("<think>a ginger cat, so", EMPTY),
        ("cat " * MAX_CHARS, TOO_LONG),
    ],
)
async def test_no_text_or_too_much_is_not_used(
    openai: FakeOpenAI,
    downloader: Downloader,
    sleeps: Sleeps,
    caplog: pytest.LogCaptureFixture,
    content: str,
    note: str,
):
    openai.content = content
    subject = enhancer(openai, downloader, sleeps)

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=note)
    assert "prompt enhancer (openai at" in caplog.text


async def test_the_answer_is_tidied_into_one_paragraph(openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps):
    openai.content = '<think>The user wants a cat.</think>\n"A ginger cat sits\n\nin the rain,\tblinking."'
    subject = enhancer(openai, downloader, sleeps)

    result = await subject.enhance(PROMPT, "t2v")
    await subject.close()

    assert result.prompt == "A ginger cat sits in the rain, blinking."


async def test_the_start_line_names_the_endpoint_model_timeout_key_and_language(
    openai: FakeOpenAI, downloader: Downloader, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("WANBOT_ENHANCER_KEY", "sk-never-shown")
    subject = enhancer(openai, downloader, sleeps)

    assert subject.describe() == (
        f"prompt enhancer: openai at {openai.url} (model qwen2.5-7b), 20 s timeout, key from $WANBOT_ENHANCER_KEY; "
        "rewrites in the prompt's language"
    )


ENHANCER_WITHOUT_TORCH = """
import asyncio, sys
from pathlib import Path
from engine.config import DownloadsConfig, PromptsConfig
from engine.enhance.enhancer import Enhancer
from engine.hub.downloads import Downloader

config = PromptsConfig(enhancer="openai", enhancer_url="http://127.0.0.1:9/v1", enhancer_retries=0)
enhancer = Enhancer(config, Downloader(Path(sys.argv[1]), DownloadsConfig()))
print(asyncio.run(enhancer.enhance("a cat", "t2v")).note)
print(sorted({"torch", "transformers", "diffusers"} & set(sys.modules)))
"""


def test_an_endpoint_enhancer_loads_no_torch(tmp_path: Path):
    """A serving process (`wanbot serve`) may enhance prompts through an endpoint without loading the model side."""
    done = subprocess.run(
        [sys.executable, "-c", ENHANCER_WITHOUT_TORCH, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [UNAVAILABLE, "[]"]
