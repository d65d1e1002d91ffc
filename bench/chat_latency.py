"""Chat latency: from a Telegram update to the user seeing "queued", through the real python-telegram-bot.

The real TelegramAdapter long-polls a fake Bot API server on 127.0.0.1 (tests/fake_telegram.py). For each sample
a new user sends either a text prompt or a 4 MB photo with a caption; the clock starts when the update is offered
to the bot's pending getUpdates and stops when the bot's answer saying "is queued" reaches the server (for the photo:
getFile, download, validation, normalisation, content-addressed store, enqueue). No worker runs, so nothing else
competes for the CPU.

    .venv/bin/python -m bench.chat_latency [--samples 40]   # from the repository root, after make test (aiohttp)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bot.telegram.adapter import TelegramAdapter
from engine.config import Settings
from engine.service import Engine
from tests.fake_telegram import FakeTelegram

TOKEN = "123456:BENCH-token"


class TimedTelegram(FakeTelegram):
    """The fake Bot API, noting when each chat's status message first says the job is queued: a text request's first
    message, a photo request's "Checking" message once edited."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.queued_at: dict[int, float] = {}

    def _do_sendMessage(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if "is queued" in fields["text"]:
            self.queued_at.setdefault(int(fields["chat_id"]), time.perf_counter())
        return super()._do_sendMessage(fields, files)

    def _do_editMessageText(self, fields: dict[str, Any], files: dict[str, bytes]) -> Any:
        if "is queued" in fields["text"]:
            self.queued_at.setdefault(int(fields["chat_id"]), time.perf_counter())
        return super()._do_editMessageText(fields, files)


def noisy_jpeg(target_bytes: int) -> bytes:
    """A photo-sized JPEG of about `target_bytes` (noise does not compress, so size follows the pixel count)."""
    rng = np.random.default_rng(1)
    side = 1024
    while True:
        pixels = rng.integers(0, 256, (side * 9 // 16, side, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        if out.tell() >= target_bytes:
            return out.getvalue()
        side += 128


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


async def measure(server: TimedTelegram, user_id: int, send: Any) -> float:
    started = time.perf_counter()
    send(user_id)
    for _ in range(10_000):
        if user_id in server.queued_at:
            return server.queued_at[user_id] - started
        await asyncio.sleep(0.001)
    raise RuntimeError(f"no queued reply for user {user_id}: {server.replies(user_id)}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    photo = noisy_jpeg(4_000_000)
    server = TimedTelegram(TOKEN)
    await server.start()
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            data_dir=Path(folder) / "data",
            models={"t2v": "tiny", "i2v": "tiny", "ti2v": "tiny"},
            queue={"global_limit": 10_000},
            telegram={"token": TOKEN, "api_base_url": f"{server.url}/bot", "file_base_url": f"{server.url}/file/bot"},
        )
        engine = await Engine.open(settings)
        adapter = TelegramAdapter(engine, settings.telegram, poll_timeout_s=1)
        await adapter.start()
        kinds = {
            "text prompt": lambda user: server.command(user, "/video t2v a red fox running through snow"),
            f"{len(photo) / 1e6:.1f} MB photo": lambda user: server.photo(user, photo, caption="/ti2v the fox turns"),
        }
        results: dict[str, list[float]] = {name: [] for name in kinds}
        user_ids = iter(range(1000, 100_000))
        for send in kinds.values():
            await measure(server, next(user_ids), send)  # warm-up: first imports, first connection
        for _ in range(args.samples):
            for name, send in kinds.items():  # interleaved
                results[name].append(await measure(server, next(user_ids), send))
        await adapter.stop()
        await engine.close()
    await server.stop()
    print(f"Telegram update -> 'queued' reply, real python-telegram-bot against a fake Bot API, {args.samples} samples")
    for name, samples in results.items():
        ms = [sample * 1000 for sample in samples]
        print(
            f"{name}: p50 {statistics.median(ms):.0f} ms, p95 {percentile(ms, 0.95):.0f} ms, "
            f"max {max(ms):.0f} ms (target p95 < 300 ms)"
        )


if __name__ == "__main__":
    asyncio.run(main())
