"""`wanbot worker --devices`: one worker process per device, each started again when it dies, all stopped together;
a device the machine does not have stops them with one clear line. Real processes on a SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import urllib.request

from engine.config import Settings
from engine.jobs import WorkerRecord, WorkerState
from engine.queue.jobqueue import JobQueue

WANBOT = [sys.executable, "-c", "from bot.cli import main; main()"]


def environment(settings: Settings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "TELEGRAM_", "DISCORD_"))}
    env.update(
        WANBOT_DATA_DIR=str(settings.data_dir),
        WANBOT_MODELS__T2V="tiny",
        WANBOT_QUEUE__HEARTBEAT_S="0.3",
        WANBOT_DOWNLOADS__ENDPOINT="http://127.0.0.1:9",
    )
    return env


async def online_pids(settings: Settings) -> dict[str, int]:
    """The configured device (cpu, auto) -> pid of its newest worker, if that one has not stopped."""
    if not settings.db_path.exists():
        return {}
    queue = await JobQueue.open(settings.db_path)
    try:
        workers = await queue.workers()
    finally:
        await queue.close()
    newest: dict[str, WorkerRecord] = {}
    for worker in workers:  # newest first: a restarted device's new process, not the one it replaced
        newest.setdefault(worker.id.split("/")[1], worker)
    return {device: w.pid for device, w in newest.items() if w.state is not WorkerState.STOPPED}


async def eventually(check, limit_s: float = 90):
    for _ in range(int(limit_s / 0.2)):
        if value := await check():
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("timed out")


async def test_one_process_per_device_restarted_when_it_dies_and_stopped_together(tiny_settings, tmp_path):
    log = (tmp_path / "workers.log").open("w")
    port = free_port_pair()
    env = {**environment(tiny_settings), "WANBOT_METRICS__PORT": str(port)}
    parent = await asyncio.create_subprocess_exec(
        *WANBOT, "worker", "--devices", "cpu,auto", env=env, stdout=log, stderr=log
    )
    try:
        first = await eventually(lambda: _both(tiny_settings))
        # One metrics port cannot serve two processes: each has its own, the first on the port configured.
        assert await eventually(lambda: asyncio.to_thread(answers, port))
        assert await eventually(lambda: asyncio.to_thread(answers, port + 1))
        os.kill(first["cpu"], signal.SIGKILL)  # a crash of one worker (a CUDA error, say)
        second = await eventually(lambda: _both(tiny_settings, not_pid=first["cpu"]))
        assert second["auto"] == first["auto"]  # the other one never stopped
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(parent.wait(), timeout=60) == 0
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        log.close()
    assert await online_pids(tiny_settings) == {}, (tmp_path / "workers.log").read_text()
    assert "starting 2 worker processes: cpu, auto" in (tmp_path / "workers.log").read_text()


def free_port_pair() -> int:
    """A port whose next one is free too."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second, contextlib.suppress(OSError):
                second.bind(("127.0.0.1", port + 1))
                return port
    raise AssertionError("no two free ports in a row")


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return b"wanbot_" in response.read()
    except OSError:
        return False


async def _both(settings: Settings, not_pid: int | None = None) -> dict[str, int] | None:
    pids = await online_pids(settings)
    return pids if len(pids) == 2 and not_pid not in pids.values() else None


async def wanbot_until_exit(settings: Settings, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *WANBOT, *args, env=environment(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode, output.decode()


async def test_a_device_the_machine_lacks_stops_all_with_one_line(tiny_settings):
    code, text = await wanbot_until_exit(tiny_settings, "worker", "--devices", "cpu,cuda:7")
    assert code == 1, text
    assert "generation.device is cuda:7, which this machine cannot use" in text
    assert "wanbot stopped: the worker for cuda:7 cannot start" in text
    assert "Traceback" not in text


async def test_device_and_devices_together_is_a_usage_error(tiny_settings):
    code, text = await wanbot_until_exit(tiny_settings, "worker", "--device", "cpu", "--devices", "cpu,auto")
    assert code == 2 and "not both" in text


async def test_parallel_workers_take_the_devices_listed_n_at_a_time(tiny_settings):
    from bot.roles.worker_processes import worker_command

    code, text = await wanbot_until_exit(tiny_settings, "worker", "--devices", "cpu,cpu,cpu", "--parallel", "2")
    assert code == 2 and "3 devices cannot make workers of --parallel 2 each: list a multiple." in text
    # Each worker process of `--devices cuda:0,cuda:1,cuda:2,cuda:3 --parallel 2` is one group of two.
    assert worker_command("cuda:2,cuda:3", None, 2)[-4:] == ["--device", "cuda:2,cuda:3", "--parallel", "2"]
