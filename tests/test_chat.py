"""The live progress message logic both adapters share, with a recording send function standing in for a platform."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from bot.chat import LiveMessages, RetryLater, parse_message, progress_text, queued_text, status_answer
from engine.config import GenerationConfig
from engine.errors import UserError
from engine.images import Mode
from engine.jobs import JobSource, Progress, Stage
from engine.models import GenerationRequest, resolve_model, resolve_request


class Platform:
    """Records the edits that reach it; fails the ones it is told to, as a real API does."""

    def __init__(self) -> None:
        self.shown: list[tuple[Any, str]] = []
        self.failures: list[Exception] = []

    async def edit(self, key: Any, text: str, extra: Any) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.shown.append((key, text))


async def test_only_the_newest_text_goes_out_and_never_twice():
    platform = Platform()
    live = LiveMessages(platform.edit, interval_s=0.05)
    for step in range(1, 6):
        live.update(1, f"step {step}/5")
    await live.settle(1)
    live.update(1, "step 5/5")
    await live.settle(1)
    assert platform.shown == [(1, "step 5/5")]


async def test_a_flood_wait_delays_the_edit_and_a_network_error_does_not_end_the_updates():
    platform = Platform()
    platform.failures = [RetryLater(0.05), ConnectionResetError("reset by peer")]
    live = LiveMessages(platform.edit, interval_s=0.01)
    live.update(7, "queued")
    await live.settle(7)
    live.update(7, "generating")
    await live.settle(7)
    assert platform.shown == [(7, "generating")]  # "queued" waited out the flood limit, then the reset lost it


async def test_state_is_dropped_once_the_last_text_is_shown():
    platform = Platform()
    live = LiveMessages(platform.edit, interval_s=0.01)
    for job in range(50):
        live.update(job, "done")
    for job in range(50):
        await live.settle(job)
        live.forget(job)
    assert len(live) == 0
    live.update(1, "first")
    await live.settle(1)
    live.update(1, "newer")
    live.forget(1)  # a newer text is still waiting: it is kept and still sent
    await live.settle(1)
    assert platform.shown[-1] == (1, "newer")
    await live.close()


async def test_options_anywhere_and_unknown_ones_named():
    parsed = parse_message('a fox seed=7 in the snow neg="blurry" colour=red note: keep it', None, has_image=True)
    assert parsed.request.prompt == "a fox in the snow note: keep it"
    assert parsed.request.seed == 7 and parsed.request.negative_prompt == "blurry"
    assert parsed.request.mode is Mode.I2V
    assert "Ignored unknown option(s): colour" in parsed.notes[0]


async def test_settle_waits_for_a_flood_limited_edit():
    platform = Platform()
    platform.failures = [RetryLater(0.1)]
    live = LiveMessages(platform.edit, interval_s=0.01)
    live.update("message", "final text")
    await asyncio.wait_for(live.settle("message"), timeout=5)
    assert platform.shown == [("message", "final text")]


async def test_status_names_the_running_job_and_its_progress(engine):
    source = JobSource(platform="cli", chat_id="local", user_id="u1")
    await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="w1 warm up"), source)
    await asyncio.wait_for(engine.worker.run(stop_after=0), timeout=90)
    release = threading.Event()
    # Holds the second job inside its first denoising step, the way a long real step would.
    engine.runner.loaded.pipeline.transformer.register_forward_pre_hook(lambda module, inputs: release.wait(30))
    second = await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="w2 a long one", steps=3), source)
    worker = asyncio.create_task(engine.worker.run(stop_after=2))
    try:
        for _ in range(300):
            answer = await status_answer(engine)
            if "generating" in answer:
                break
            await asyncio.sleep(0.05)
    finally:
        release.set()
    await asyncio.wait_for(worker, timeout=90)
    assert answer.splitlines() == [
        "Worker: working. Loaded model: tiny-t2v.",
        "Queued: 0, running: 1.",
        f"Now: Job #{second.result.job.id}: generating (high-noise expert) · ░░░░░░░░░░░░ 0/3",
    ]
    assert "Now:" not in await status_answer(engine)


def test_a_huge_bad_option_is_quoted_short_so_the_error_can_still_be_sent():
    for text in ("a fox res=" + "9" * 1900 + "x", "a fox mode=" + "z" * 1900, "a fox steps=" + "s" * 1900):
        with pytest.raises(UserError) as caught:
            request = parse_message(text, None, has_image=False).request
            resolve_request(request, resolve_model("tiny", Mode.T2V), GenerationConfig())
        assert len(str(caught.value)) < 200 and "…'" in caught.value.message


async def test_the_notes_on_a_request_stay_on_its_place_and_its_progress(engine):
    source = JobSource(platform="cli", chat_id="local", user_id="u1")
    request = GenerationRequest(mode=Mode.T2V, prompt="w1 a fox", frames=10)
    submission = await engine.submit(request, source, notes=["Ignored unknown option(s): colour."])
    job = submission.result.job
    running = progress_text(job, Progress(stage=Stage.DENOISING, step=1, total=4))
    waiting = queued_text(job, submission.result.position)
    for text in (running, waiting):
        assert "• Frames must be 4k+1 between 5 and 121: using 9 instead of 10." in text
        assert "• Ignored unknown option(s): colour." in text
    assert running.startswith("Job #1: generating\n") and waiting.startswith("Job #1 (t2v) is queued: position 1")
