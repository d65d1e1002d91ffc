"""The live progress message logic both adapters share, with a recording send function standing in for a platform."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bot.chat.relay import JobRelay
from bot.chat.texts import (
    OPTION_PATTERN,
    QUEUE_PAUSED,
    LiveMessages,
    RetryLater,
    help_text,
    parse_message,
    progress_text,
    queued_text,
    with_notes,
)
from engine.config import ChatConfig, GenerationConfig, ModelsConfig
from engine.errors import UserError
from engine.jobs import Job, JobSource, JobStatus, Progress, QueuePosition, Stage, WorkerRecord, WorkerState
from engine.pipeline.models import GenerationRequest, resolve_model, resolve_request
from engine.storage.images import Mode
from tests import factories
from tests.running import until


class Platform:
    """Records the edits that reach it; fails the ones it is told to, as a real API does."""

    def __init__(self) -> None:
        self.shown: list[tuple[Any, str]] = []
        self.failures: list[Exception] = []

    async def edit(self, key: Any, text: str, extra: Any) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.shown.append((key, text))


class SlowPlatform:
    """A platform that takes a while for each text (its rate limit, say), noting the order they arrive in and how many
    texts for `waiting` keys (jobs whose places are refreshed) it was sent at once."""

    def __init__(self, seconds: float, waiting: set[Any]) -> None:
        self.seconds = seconds
        self.waiting = waiting
        self.shown: list[tuple[Any, str]] = []
        self.refreshes_at_once = 0
        self._refreshing = 0

    async def edit(self, key: Any, text: str, extra: Any) -> None:
        refresh = key in self.waiting and text.startswith("place")
        self._refreshing += refresh
        self.refreshes_at_once = max(self.refreshes_at_once, self._refreshing)
        self.shown.append((key, text))
        await asyncio.sleep(self.seconds)
        self._refreshing -= refresh


async def test_answers_go_before_waiting_refreshes_and_stale_refreshes_are_dropped():
    platform = SlowPlatform(seconds=0.02, waiting=set(range(1, 21)))
    live = LiveMessages(platform.edit, interval_s=0)
    for key in range(1, 21):
        live.update(key, f"place of {key}: {key + 1}", refresh=True)
    live.update(99, "answer to 99")  # a new job's answer, asked for after twenty places
    live.update(5, "place of 5: 1", refresh=True)  # a newer place replaces the one still waiting
    live.update(7, "job 7 is starting")  # the job started: its waiting place is never shown
    live.update(50, "answer to 50")
    live.update(50, "place of 50: 3", refresh=True)  # replaces an answer not sent yet: still an answer
    for key in (*range(1, 21), 50, 99):
        await asyncio.wait_for(live.settle(key), timeout=10)
    order = [text for _, text in platform.shown]
    first_place = order[0] if order[0].startswith("place") else None  # one place may have left before any answer
    answers = [text for text in order if text != first_place][:3]
    assert sorted(answers) == ["answer to 99", "job 7 is starting", "place of 50: 3"], order
    assert "place of 5: 6" not in order and "place of 5: 1" in order
    assert not any(text.startswith("place of 7") for text in order)
    assert len(order) == 22 and platform.refreshes_at_once == 1  # keys 1 to 20, 50 and 99; one refresh at a time
    await live.close()


class RecordingChat:
    """A chat platform for the relay: notes each text with its job, slowly (slower than the relay reads the
    queue, even on a loaded machine, so that what waits for the platform is what the test looks at)."""

    def __init__(self, send_s: float = 0.3) -> None:
        self.shown: list[tuple[int, str]] = []
        self._send_s = send_s

    async def show(self, job: Job, text: str, buttons: str, picture: bytes | None = None) -> None:
        self.shown.append((job.id, text))
        await asyncio.sleep(self._send_s)

    async def send_video(self, job: Job, video: Path) -> None:
        raise AssertionError("no video in this test")


async def test_the_relay_answers_a_new_job_before_the_places_a_start_refreshes(engine):
    platform = RecordingChat()
    queue = engine._queue
    config = ChatConfig(edit_interval_s=0)
    relay = JobRelay(engine, "telegram", platform.show, platform.send_video, lambda job: 50_000_000, config)
    relay.start(engine.subscribe())
    await asyncio.wait_for(relay.caught_up.wait(), timeout=10)
    try:
        for user in range(12):
            await queue.enqueue(factories.source(f"u{user}", f"m{user}"), Mode.T2V, "tiny", factories.params())
        await until(lambda: len(platform.shown) == 12, limit_s=30, what="twelve answers")
        platform.shown.clear()
        started = await queue.claim_next()  # the queue moves: eleven places to refresh
        late = (await queue.enqueue(factories.source("late", "m-late"), Mode.T2V, "tiny", factories.params())).job
        await until(lambda: len(platform.shown) == 13, limit_s=30, what="the places, the start and the answer")
    finally:
        await relay.stop()
    order = [job_id for job_id, _ in platform.shown]
    places_before = [job_id for job_id in order[: order.index(late.id)] if job_id != started.id]
    assert len(places_before) <= 1, platform.shown  # only a place already being sent went first
    assert "starting" in dict(platform.shown)[started.id]


async def test_only_the_newest_text_goes_out_and_never_twice():
    platform = Platform()
    live = LiveMessages(platform.edit, interval_s=0.05)
    for step in range(1, 6):
        live.update(1, f"step {step}/5")
    await live.settle(1)
    live.update(1, "step 5/5")
    await live.settle(1)
    assert platform.shown == [(1, "step 5/5")]


async def test_an_end_text_goes_out_at_once_past_a_progress_text_waiting_for_the_pace():
    platform = Platform()
    live = LiveMessages(platform.edit, interval_s=600)
    live.update(1, "starting")
    await live.settle(1)
    live.update(1, "step 1/4")  # waits out the 600 s pace
    await asyncio.sleep(0.05)
    live.update(1, "done", at_once=True)
    await asyncio.wait_for(live.settle(1), timeout=5)
    assert platform.shown == [(1, "starting"), (1, "done")]


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
    assert "Ignored an unknown option: colour" in parsed.notes[0]
    two = parse_message("a fox colour=red mood=calm colour=blue", None, has_image=False)
    assert two.notes[0].startswith("Ignored unknown options: colour, mood. Known: ")  # each once, never "option(s)"


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
    await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
    release = threading.Event()
    # Holds the second job inside its first denoising step, the way a long real step would.
    engine._runner.loaded.pipeline.transformer.register_forward_pre_hook(lambda module, inputs: release.wait(30))
    second = await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="w2 a long one", steps=3), source)
    job_id = second.result.job.id
    # The heartbeat of a worker running the job, as the worker stores it (the worker's own may come as well).
    worker = WorkerRecord(id="gpu-a-1", host="gpu-a", pid=1, device="cuda:0", started_at=time.time())
    await engine._queue.heartbeat(worker.model_copy(update={"state": WorkerState.WORKING, "current_job": job_id}))
    running = asyncio.create_task(engine._worker.run(stop_after=2))
    try:
        for _ in range(300):
            answer = await factories.status_answer(engine)
            if "generating" in answer:
                break
            await asyncio.sleep(0.05)
    finally:
        release.set()
    await asyncio.wait_for(running, timeout=90)
    lines = answer.splitlines()
    assert lines[0].startswith("Workers: ") and "working" in lines[0]
    assert lines[1] == "Queued: 0, running: 1."
    assert (
        f"Worker gpu-a/cuda:0: making Job #{job_id}, quality preset: generating, part 1 of 2 · ░░░░░░░░░░░░ 0/3 · "
        "time left not known yet."
    ) in lines
    await engine._queue.heartbeat(worker.model_copy(update={"state": WorkerState.IDLE}))
    assert "making" not in await factories.status_answer(engine)


@pytest.mark.parametrize("mode", list(Mode))
def test_every_option_example_in_the_help_works_unchanged_for_every_mode_and_model(mode: Mode):
    examples = [match.group(0) for match in OPTION_PATTERN.finditer(help_text("/video a fox"))]
    assert {"size=832x480", "frames=49", "steps=30", "preset=fast"} <= set(examples)
    for model in ("tiny", getattr(ModelsConfig(), mode.value)):  # the tiny and the default model
        for example in examples:
            parsed = parse_message(f"a fox {example}", mode, has_image=mode is not Mode.T2V)
            request = parsed.request.model_copy(update={"mode": mode})
            params = resolve_request(request, resolve_model(model, mode), GenerationConfig())
            assert parsed.notes == [], example
            changed = [note for note in params.adjustments if note.startswith(("Size", "Frames", "Steps", "Guid"))]
            assert changed == [], (model, example)


def test_the_hint_for_frames_that_are_no_number_gives_a_frame_count_the_models_take():
    with pytest.raises(UserError) as caught:
        parse_message("a fox frames=many", None, has_image=False)
    assert caught.value.hint == "For example frames=49."  # 4k+1: the example is not adjusted in its turn


def test_a_huge_bad_option_is_quoted_short_so_the_error_can_still_be_sent():
    for text in ("a fox res=" + "9" * 1900 + "x", "a fox mode=" + "z" * 1900, "a fox steps=" + "s" * 1900):
        with pytest.raises(UserError) as caught:
            request = parse_message(text, None, has_image=False).request
            resolve_request(request, resolve_model("tiny", Mode.T2V), GenerationConfig())
        assert len(str(caught.value)) < 200 and "…'" in caught.value.message


async def test_waits_and_times_left_never_say_0s_and_say_when_they_are_not_known(engine):
    source = JobSource(platform="cli", chat_id="local", user_id="u1")
    job = (await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="a fox", steps=1), source)).result.job
    assert "1 step, seed" in queued_text(job, QueuePosition(position=1, eta_s=0.0))  # not "1 steps"
    waits = {eta_s: queued_text(job, QueuePosition(position=2, eta_s=eta_s)).splitlines()[0] for eta_s in (None, 0, 95)}
    assert waits == {
        None: "Job #1 (t2v) is queued: position 2, the wait is not known yet.",
        0: "Job #1 (t2v) is queued: position 2, about to start.",
        95: "Job #1 (t2v) is queued: position 2, about 1m 35s to wait.",
    }
    left = {
        "time left not known yet": Progress(stage=Stage.DECODING, step=4, total=4),
        "less than a second left": Progress(stage=Stage.ENCODING, step=4, total=4, eta_s=0.4),
        "about 12s left for the steps, then decoding": Progress(
            stage=Stage.DENOISING, step=1, total=4, eta_s=12, eta_steps_only=True
        ),
        "about 20s left": Progress(stage=Stage.DENOISING, step=1, total=4, eta_s=20),
    }
    for said, progress in left.items():
        assert progress_text(job, progress).splitlines()[1].endswith(f" · {said}")


async def test_the_notes_on_a_request_go_with_its_first_text_only(engine):
    source = JobSource(platform="cli", chat_id="local", user_id="u1")
    request = GenerationRequest(mode=Mode.T2V, prompt="w1 a fox", frames=10)
    submission = await engine.submit(request, source, notes=["Ignored an unknown option: colour."])
    job = submission.result.job
    running = progress_text(job, Progress(stage=Stage.DENOISING, step=1, total=4))
    waiting = queued_text(job, submission.result.position)
    notes = [
        "• Frames must be 4k+1 between 5 and 121: using 9 instead of 10.",
        "• Ignored an unknown option: colour.",
    ]
    for text in (running, waiting):
        assert with_notes(job, text) == "\n".join([text, *notes])
        assert "•" not in text  # the edits after the first text do not repeat them
    assert running.startswith("Job #1, fast preset: generating\n") and waiting.startswith(
        "Job #1 (t2v) is queued: position 1"
    )


async def test_a_message_sent_again_is_told_its_job_in_one_plain_sentence(engine):
    source = JobSource(platform="cli", chat_id="local", user_id="u1")
    job = (await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="a fox", steps=1), source)).result.job
    first_lines = {
        "waiting": queued_text(job, QueuePosition(position=2, eta_s=95), duplicate=True),
        "paused": queued_text(job, QueuePosition(position=2, eta_s=95), duplicate=True, paused=True),
        "ended": queued_text(job.model_copy(update={"status": JobStatus.SUCCEEDED}), None, duplicate=True),
    }
    assert {name: text.splitlines()[0] for name, text in first_lines.items()} == {
        "waiting": "Job #1 (t2v) was already queued from this message: position 2, about 1m 35s to wait.",
        "paused": f"Job #1 (t2v) was already queued from this message: position 2. {QUEUE_PAUSED}",
        "ended": "Job #1 (t2v) came from this message before: succeeded.",
    }
