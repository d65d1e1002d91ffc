"""`wanbot worker --devices cuda:0,cuda:1`: one worker process per GPU, each started again when it dies (a CUDA error
in one never takes the others down), all stopped together on Ctrl+C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CONFIG_ERROR = 2  # what `wanbot` exits with for a setting or argument no restart can fix
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 60.0
HEALTHY_AFTER_S = 300.0  # a child that ran this long before dying starts its backoff again
STOP_WAIT_S = 60.0  # how long a child may take to put its job back in the queue after SIGTERM


def thread_limits(devices: list[str]) -> dict[str, str]:
    """CPU workers on one machine share its cores: torch's default of a thread per core in each would have them wait
    on each other (bench/scale.py measured a tenth of the speed). An OMP_NUM_THREADS already set is kept."""
    on_cpu = sum(device == "cpu" for device in devices)
    if on_cpu < 2 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // on_cpu))}


def worker_command(device: str, config: str | None, parallel: int = 1) -> list[str]:
    """`device`: one device, or a parallel group's ("cuda:0,cuda:1")."""
    command = [sys.executable, "-c", "from bot.cli import main; main()", "worker", "--device", device]
    command += ["--parallel", str(parallel)] if parallel > 1 else []
    return [*command, "--config", config] if config else command


async def run_worker_processes(
    devices: list[str],
    config: str | None,
    say: Callable[[str], None],
    metrics_port: int | None = None,
    parallel: int = 1,
) -> str | None:
    """Keep one `wanbot worker --device D` running per device until a signal (None), or until one cannot start
    because of its configuration (what failed). With `metrics_port`, the Nth process serves metrics on that port + N:
    one port cannot serve them all."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    failures: list[str] = []
    say(f"wanbot starting {len(devices)} worker processes: {', '.join(devices)}; Ctrl+C stops them all")
    env = {**os.environ, **thread_limits(devices)}
    envs = [env] * len(devices)
    if metrics_port is not None:
        envs = [{**env, "WANBOT_METRICS__PORT": str(metrics_port + index)} for index in range(len(devices))]
        say(f"metrics of {devices[0]} on port {metrics_port}, of each next device on the next port")
    keepers = [
        asyncio.create_task(_keep(device, config, child_env, stop, failures, parallel))
        for device, child_env in zip(devices, envs, strict=True)
    ]
    await asyncio.gather(*keepers)
    return failures[0] if failures else None


async def _keep(
    device: str, config: str | None, env: dict[str, str], stop: asyncio.Event, failures: list[str], parallel: int
) -> None:
    wait_s = FIRST_WAIT_S
    while not stop.is_set():
        started = time.monotonic()
        child = await asyncio.create_subprocess_exec(*worker_command(device, config, parallel), env=env)
        stopping = asyncio.ensure_future(stop.wait())
        exited = asyncio.ensure_future(child.wait())
        await asyncio.wait([stopping, exited], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            await _stop_child(child, device)
            return
        code = exited.result()
        if code == CONFIG_ERROR:
            failures.append(f"the worker for {device} cannot start (exit {code}; its error is above)")
            stop.set()
            return
        if time.monotonic() - started >= HEALTHY_AFTER_S:
            wait_s = FIRST_WAIT_S
        log.error("worker process for %s exited with %s; starting it again in %.0f s", device, code, wait_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):  # not wait_for, which can swallow a cancel (engine/queue/follower.py)
                await stop.wait()
        wait_s = min(wait_s * 2, MAX_WAIT_S)


async def _stop_child(child: asyncio.subprocess.Process, device: str) -> None:
    """SIGTERM: the child puts its running job back in the queue and exits; one that hangs is killed."""
    if child.returncode is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.wait(), timeout=STOP_WAIT_S)
    except TimeoutError:
        log.error("worker process for %s did not stop in %.0f s; killing it", device, STOP_WAIT_S)
        child.kill()
        await child.wait()
