"""A follower rank's loop: the same pipeline as rank 0, on its own device, making each job rank 0 sends in step
with it; what it makes is thrown away (rank 0 decodes, encodes and keeps the video)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from typing import Any

from PIL import Image

from engine.config import Settings
from engine.errors import UserError
from engine.hub.downloads import Downloader
from engine.jobs import Job
from engine.parallel.group import GroupPlan, RankGroup, check_heads, split_over_ranks
from engine.pipeline.generate import PipelineRunner, default_locator
from engine.pipeline.hooks import GroupBroken, JobCancelled, JobInterrupted, RunHooks
from engine.pipeline.libraries import quiet_libraries

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # prctl's option: the signal a process gets when its parent dies


def follow(rank: int, plan: GroupPlan, address: str, settings_json: str) -> None:
    """A follower rank's process (rank 0 starts it): load as rank 0 does, then make every job rank 0 sends, until it
    says stop."""
    die_with_parent()
    settings = Settings.model_validate_json(settings_json)
    group = RankGroup.joined(plan, rank, address)
    try:
        run_follower(group, settings)
    finally:
        group.close()


def die_with_parent() -> None:
    """A follower ends with rank 0's process, also when that is killed (-9): else it would hold its GPU's memory until
    the group's timeout, beside the new group the restarted worker makes. (Linux's PR_SET_PDEATHSIG; elsewhere the
    timeout ends it.)"""
    libc = ctypes.util.find_library("c")
    if libc is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(libc, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # rank 0 died before the line above took effect
        os._exit(1)


def run_follower(group: RankGroup, settings: Settings) -> None:
    quiet_libraries()
    generation = settings.generation.model_copy(update={"device": group.plan.devices[group.rank]})
    downloader = Downloader(settings.models_dir, settings.downloads)
    ranks = FollowerRanks(group)
    runner = PipelineRunner(generation, default_locator(settings, downloader), ranks=ranks)
    while (received := group.receive()) is not None:
        job, images = received
        try:
            runner.run(job, images, RunHooks(agree=ranks.agree, decode=False))
        except (JobCancelled, JobInterrupted):
            log.info("rank %d: job=%s stopped as rank 0 said", group.rank, job.id)
        except UserError as error:
            # Settings the job cannot run with, found alike on every rank: rank 0 fails it and says so.
            log.info("rank %d: job=%s failed as on rank 0: %s", group.rank, job.id, error)
        except GroupBroken:
            raise
        except Exception:
            # This rank alone: its process ends, which breaks the group at once; rank 0 then starts a new one.
            log.exception("rank %d: job=%s failed; leaving the group", group.rank, job.id)
            raise
    runner.unload()


class FollowerRanks:
    """A rank other than 0, in a process rank 0 started: it is told its jobs and does as rank 0 decides."""

    def __init__(self, group: RankGroup) -> None:
        self._group = group

    @property
    def size(self) -> int:
        return self._group.size

    def prepare(self) -> bool:
        return False

    def announce(self, job: Job, images: list[Image.Image]) -> None:
        """A follower was told already (that is how it got the job)."""

    def agree(self, decision: int) -> int:
        return self._group.agree(decision)

    def lost(self, error: BaseException) -> bool:
        return self._group.lost(error)

    def check_heads(self, heads: int) -> None:
        check_heads(heads, self.size)

    def parallelize(self, transformer: Any) -> None:
        split_over_ranks(transformer, self.size)

    def close(self) -> None:
        """The group is closed by the process that made it."""
