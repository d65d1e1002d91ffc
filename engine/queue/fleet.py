"""The workers as one fleet: who is alive, and the jobs of the ones that are gone put back in the queue. Used by
workers and by the serving process alike; imports no torch."""

from __future__ import annotations

import logging

from engine.config import Settings
from engine.jobs import Job
from engine.queue.jobqueue import JobQueue
from engine.queue.processes import pid_alive, this_machine

log = logging.getLogger(__name__)


async def recover_orphans(queue: JobQueue, settings: Settings) -> list[Job]:
    """Put back (or fail, after max_attempts) the running jobs whose worker is gone: stopped, silent past lease_s, or
    a process of this machine that has ended (a crash of the last `wanbot run` is seen at once)."""
    config = settings.queue
    recovered = await queue.recover_interrupted(config.max_attempts, config.lease_s, this_machine(), pid_alive)
    for job in recovered:
        log.warning("recovered interrupted job=%s now=%s attempts=%s", job.id, job.status.value, job.attempts)
    return recovered
