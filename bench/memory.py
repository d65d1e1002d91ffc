"""Memory of the real `wanbot run` process: idle, and while the tiny model generates a video.

`wanbot run` starts with a Telegram token and talks to a fake Bot API on 127.0.0.1 (tests/fake_telegram.py). Its
resident set (VmRSS) and peak (VmHWM) come from /proc: after start-up while idle, then while a /video job runs on
the tiny t2v model until the video is uploaded.

    .venv/bin/python -m bench.memory [--idle-s 5] [--steps 20]   # from the repository root, after make test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

from tests.fake_telegram import FakeTelegram

TOKEN = "123456:BENCH-token"


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    server = FakeTelegram(TOKEN)
    await server.start()
    with tempfile.TemporaryDirectory() as folder:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "TELEGRAM_"))}
        env.update(
            WANBOT_DATA_DIR=str(Path(folder) / "data"),
            WANBOT_MODELS__T2V="tiny",
            TELEGRAM_BOT_TOKEN=TOKEN,
            WANBOT_TELEGRAM__API_BASE_URL=f"{server.url}/bot",
            WANBOT_TELEGRAM__FILE_BASE_URL=f"{server.url}/file/bot",
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from bot.cli import main; main()", "run", env=env, stderr=asyncio.subprocess.DEVNULL
        )
        for _ in range(600):  # started once it has asked for updates
            if server.sent("getUpdates"):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(args.idle_s)
        idle = memory_mib(process.pid)
        server.command(111, f"/video a red fox running through snow steps={args.steps} frames=33")
        running_rss = 0.0
        for _ in range(3000):
            if server.sent("sendVideo"):
                break
            running_rss = max(running_rss, memory_mib(process.pid)["VmRSS"])
            await asyncio.sleep(0.1)
        done = memory_mib(process.pid)
        process.send_signal(signal.SIGTERM)
        await process.wait()
    await server.stop()
    if not server.sent("sendVideo"):
        raise RuntimeError("the video never arrived")
    print("wanbot run (worker + Telegram adapter), tiny t2v model, 33 frames")
    print(f"idle after start-up: RSS {idle['VmRSS']:.0f} MiB (peak so far {idle['VmHWM']:.0f} MiB)")
    print(f"while generating:    RSS up to {running_rss:.0f} MiB, peak {done['VmHWM']:.0f} MiB")
    print(f"after delivery:      RSS {done['VmRSS']:.0f} MiB (model kept warm)")


if __name__ == "__main__":
    asyncio.run(main())
