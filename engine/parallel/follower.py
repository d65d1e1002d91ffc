"""A follower rank's loop: the same pipeline as rank 0, on its own device, making each job rank 0 sends in step
with it; what it makes is thrown away (rank 0 decodes, encodes and keeps the video)."""

from __future__ import annotations

import logging

from engine.config import Settings
from engine.errors import UserError
from engine.hub.downloads import Downloader
from engine.parallel.group import RankGroup
from engine.parallel.ranks import FollowerRanks
from engine.pipeline.generate import PipelineRunner, default_locator
from engine.pipeline.hooks import GroupBroken, JobCancelled, JobInterrupted, RunHooks
from engine.pipeline.libraries import quiet_libraries

log = logging.getLogger(__name__)


def run_follower(group: RankGroup, settings: Settings) -> None:
    quiet_libraries()
    generation = settings.generation.model_copy(update={"device": group.plan.devices[group.rank]})
    downloader = Downloader(settings.models_dir, settings.downloads)
    ranks = FollowerRanks(group)
    runner = PipelineRunner(generation, default_locator(settings, downloader), ranks=ranks)
    while (received := group.receive()) is not None:
        job, images = received
        try:
            runner.run(job, images, RunHooks(agree=ranks.agree))
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
