"""Chat under load: 200 `/video` text requests from 50 users in 10 s, through the real python-telegram-bot.

The real TelegramAdapter (with its AIORateLimiter: 30 requests a second to chats, as Telegram allows) long-polls a
fake Bot API server on 127.0.0.1 (tests/fake_telegram.py). Each of 50 users sends a text request every 2.5 s, four
in all, so the fourth finds the user's three waiting jobs and is refused. Meanwhile a stand-in worker moves the queue
once a second: it claims the next job (every waiting job's place changes), reports three steps and fails it, so the
bot has places to refresh, progress to show and an end to show, as it would with a real GPU behind it, without
spending the CPU on generating.

The clock of a request starts when its update is offered to the bot's pending getUpdates and stops when the server
receives the first answer about it, queued or refused: the bot's first message about it that is not "Checking your
request…", or the first edit of that "Checking" message. Printed: p50, p95 and max of that, and how many messages and
edits the bot sent until it fell quiet (and how many places it drew over a job that had started or ended).

    .venv/bin/python -m bench.chat_load [--requests 200 --users 50 --seconds 10]   # from the repository root
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.chat_latency import percentile
from bot.telegram.adapter import TelegramAdapter
from engine.config import Settings
from engine.jobs import Progress, Stage
from engine.queue.jobqueue import JobQueue
from engine.service import Engine
from tests.fake_telegram import FakeTelegram

TOKEN = "123456:BENCH-token"
CHECKING = "Checking your request…"
QUIET_S = 2.0  # the bot is done when it has sent nothing for this long
LIMIT_S = 120.0  # the whole run, load and drain, is cut off after this


class LoadTelegram(FakeTelegram):
    """The fake Bot API, noting when the first answer about each request arrives and what every edit said."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.asked_at: dict[int, float] = {}  # request message id -> when the update was offered
        self.answered_at: dict[int, float] = {}  # request message id -> when its first answer arrived
        self.answers: dict[int, str] = {}
        self.request_of: dict[int, int] = {}  # status message id -> request message id
        self._unanswered: dict[int, list[int]] = {}  # chat id -> its requests without a status message, oldest first
        self.last_call_at = time.perf_counter()
        self.stale_places = 0  # "queued" edits drawn over a message that already showed the job running or ended

    def ask(self, user_id: int, text: str) -> None:
        message = self.command(user_id, text)
        self.asked_at[message["message_id"]] = time.perf_counter()
        self._unanswered.setdefault(user_id, []).append(message["message_id"])

    def _answer(self, request_id: int | None, text: str) -> None:
        if request_id is not None and text != CHECKING and request_id not in self.answered_at:
            self.answered_at[request_id] = time.perf_counter()
            self.answers[request_id] = text

    def _do_sendMessage(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        self.last_call_at = time.perf_counter()
        message = super()._do_sendMessage(fields, files)
        # A private chat's answers quote nothing: a user's requests (2.5 s apart) are answered in order.
        waiting = self._unanswered.get(int(fields["chat_id"]))
        if waiting and isinstance(message, dict):
            request_id = waiting.pop(0)
            self.request_of[message["message_id"]] = request_id
            self._answer(request_id, fields["text"])
        return message

    def _do_editMessageText(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        self.last_call_at = time.perf_counter()
        message_id = int(fields["message_id"])
        before = self.messages.get((int(fields["chat_id"]), message_id), {}).get("text", "")
        if "is queued" in fields["text"] and before != CHECKING and "is queued" not in before:
            self.stale_places += 1
        self._answer(self.request_of.get(message_id), fields["text"])
        return super()._do_editMessageText(fields, files)


async def stand_in_worker(queue: JobQueue, every_s: float) -> None:
    """Moves the queue like a worker whose jobs end quickly: claim, three steps, fail."""
    while True:
        await asyncio.sleep(every_s)
        job = await queue.claim_next()
        if job is None:
            continue
        for step in range(1, 4):
            progress = Progress(stage=Stage.DENOISING, step=step, total=3)
            await queue.update_progress(job.id, progress, persist=False, token=job.claim_token)
            await asyncio.sleep(every_s / 8)
        await queue.mark_failed(job.id, "the bench's stand-in worker makes no videos", token=job.claim_token)


async def send_load(server: LoadTelegram, requests: int, users: int, seconds: float) -> None:
    """`requests` spread evenly over `seconds`, the users taking turns."""
    start = time.perf_counter()
    for index in range(requests):
        await asyncio.sleep(max(0.0, start + index * seconds / requests - time.perf_counter()))
        user = 10_000 + index % users
        server.ask(user, f"/video request {index} of user {user}: a red fox running through snow")


async def poll(condition: Callable[[], bool], deadline: float) -> None:
    """Look every 10 ms until `condition` holds or `deadline` (perf_counter) passes."""
    for _ in range(int(LIMIT_S * 100)):
        if condition() or time.perf_counter() >= deadline:
            return
        await asyncio.sleep(0.01)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--move-every-s", type=float, default=1.0, help="how often the stand-in worker claims a job")
    args = parser.parse_args()
    server = LoadTelegram(TOKEN)
    await server.start()
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            data_dir=Path(folder) / "data",
            models={"t2v": "tiny", "i2v": "tiny", "ti2v": "tiny"},
            queue={"global_limit": 10_000},  # the per-user limit (3) is what refuses
            telegram={"token": TOKEN, "api_base_url": f"{server.url}/bot", "file_base_url": f"{server.url}/file/bot"},
        )
        engine = await Engine.open(settings)
        adapter = TelegramAdapter(engine, settings.telegram, poll_timeout_s=1)
        await adapter.start()
        server.ask(1, "/video warm up")  # first imports, first connection; not counted
        deadline = time.perf_counter() + LIMIT_S
        await poll(lambda: bool(server.answered_at), deadline)
        warm_up = set(server.asked_at)
        calls_before = len(server.calls)
        worker = asyncio.create_task(stand_in_worker(engine._queue, args.move_every_s))
        await send_load(server, args.requests, args.users, args.seconds)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        await poll(
            lambda: (
                len(server.answered_at) == len(server.asked_at) and time.perf_counter() - server.last_call_at >= QUIET_S
            ),
            deadline,
        )
        await adapter.stop()
        jobs = len(await engine._queue.list_jobs(limit=100_000)) - 1
        await engine.close()
    await server.stop()
    asked = {key: at for key, at in server.asked_at.items() if key not in warm_up}
    latencies = [(server.answered_at[key] - at) * 1000 for key, at in asked.items() if key in server.answered_at]
    answers = [server.answers[key] for key in asked if key in server.answers]
    load = server.calls[calls_before:]
    edits = sum(call.method == "editMessageText" for call in load)
    print(
        f"{len(asked)} /video text requests from {args.users} users in {args.seconds:.0f} s, real python-telegram-bot "
        f"against a fake Bot API; the queue moves every {args.move_every_s:g} s"
    )
    print(
        f"update -> first answer (queued or refused), {len(latencies)} answered: "
        f"p50 {statistics.median(latencies):.0f} ms, p95 {percentile(latencies, 0.95):.0f} ms, "
        f"max {max(latencies):.0f} ms (target p95 < 1000 ms)"
    )
    print(
        f"answers: {sum('is queued' in text for text in answers)} queued, "
        f"{sum('is queued' not in text for text in answers)} refused; {jobs} jobs"
    )
    print(
        f"sent until quiet: {sum(call.method == 'sendMessage' for call in load)} messages, {edits} edits "
        f"({server.stale_places} places drawn over a running or ended job)"
    )


if __name__ == "__main__":
    asyncio.run(main())
