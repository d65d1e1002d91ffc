"""The workers as one fleet: who is alive, and the jobs of the ones that are gone put back in the queue. Used by
workers and by the serving process alike; imports no torch."""

from __future__ import annotations

import functools
import logging
import os
import socket

from engine.config import Settings
from engine.jobs import Job
from engine.queue.jobqueue import JobQueue

log = logging.getLogger(__name__)


@functools.cache
def this_machine() -> str:
    """Where a process id means this process: the host, and its PID namespace (containers on one host, even with
    the host's name, each have their own)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{namespace}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def recover_orphans(queue: JobQueue, settings: Settings) -> list[Job]:
    """Put back (or fail, after max_attempts) the running jobs whose worker is gone: stopped, silent past lease_s, or
    a process of this machine that has ended (a crash of the last `wanbot run` is seen at once)."""
    config = settings.queue
    recovered = await queue.recover_interrupted(config.max_attempts, config.lease_s, this_machine(), pid_alive)
    for job in recovered:
        log.warning("recovered interrupted job=%s now=%s attempts=%s", job.id, job.status.value, job.attempts)
    return recovered
