"""One process serves a database's chats: a second `wanbot serve` (or `wanbot run` with a chat token) would answer
every request and upload every video again, so it refuses to start with one line naming the first, and starts once
the first is gone (stopped, or killed: at once on the same machine)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from engine.queue.url import sqlite_url
from tests.fake_telegram import FakeTelegram
from tests.roles.test_scale_out import WANBOT, role_env
from tests.running import until


async def _serve(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("a") as output:
        return await asyncio.create_subprocess_exec(*WANBOT, "serve", env=env, stdout=output, stderr=output)


async def test_a_second_serve_refuses_to_start_and_takes_over_once_the_first_is_gone(
    tmp_path: Path, telegram: FakeTelegram
):
    data = tmp_path / "data"
    env = role_env(data, sqlite_url(data / "wanbot.sqlite3"), telegram)
    first_log, second_log, third_log = (tmp_path / f"{name}.log" for name in ("first", "second", "third"))
    first = await _serve(env, first_log)
    try:
        await until(lambda: "wanbot serving" in first_log.read_text(), limit_s=60, what="the first serve")
        second = await _serve(env, second_log)
        assert await asyncio.wait_for(second.wait(), timeout=60) == 2
        refusal = second_log.read_text()
        assert f"Not started: another wanbot process already serves the chats of this database: pid {first.pid}" in (
            refusal
        )
        assert "wanbot serving" not in refusal and "Traceback" not in refusal
        assert first.returncode is None  # the first goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()

    third = await _serve(env, third_log)
    try:
        await until(lambda: "wanbot serving" in third_log.read_text(), limit_s=60, what="the serve after a kill -9")
    finally:
        third.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(third.wait(), timeout=60) == 0, third_log.read_text()[-3000:]
    fourth = await _serve(env, second_log)  # a clean stop released the lease: the next one starts at once
    try:
        await until(lambda: second_log.read_text().count("wanbot serving") == 1, limit_s=60, what="a later serve")
    finally:
        fourth.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(fourth.wait(), timeout=60) == 0
