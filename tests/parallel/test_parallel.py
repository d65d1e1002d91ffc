"""One video on two ranks (gloo on the CPU, the tiny models): the same frames as one process for the same seed, a
cancel that stops both ranks at the same step, a rank killed mid-job, and the group started again for the next."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest

from engine.config import Settings
from engine.hub.downloads import Downloader
from engine.parallel.group import GroupPlan
from engine.parallel.ranks import LeaderRanks
from engine.pipeline.generate import PipelineRunner, default_locator
from engine.pipeline.hooks import GroupBroken, JobCancelled, RunHooks
from tests.pipeline.test_generate import submit

pytestmark = pytest.mark.timeout(300)


def leader(settings: Settings, size: int = 2) -> tuple[PipelineRunner, LeaderRanks]:
    ranks = LeaderRanks(GroupPlan(devices=["cpu"] * size, timeout_s=60), settings)
    downloader = Downloader(settings.models_dir, settings.downloads)
    return PipelineRunner(settings.generation, default_locator(settings, downloader), ranks=ranks), ranks


async def test_two_ranks_make_the_same_frames_as_one_process_stop_together_and_survive_a_killed_rank(engine, capsys):
    job = (await submit(engine, "t2v", seed=42, steps=3, frames=9)).result.job
    alone = (await asyncio.to_thread(engine._runner.run, job, [], RunHooks())).frames
    runner, ranks = leader(engine.settings)
    try:
        together = (await asyncio.to_thread(runner.run, job, [], RunHooks())).frames
        difference = float(np.abs(together - alone).max())
        print(f"largest difference between 1 and 2 ranks: {difference}")
        assert difference <= 1e-5

        # A cancel at step 1 stops rank 0 and its follower alike: the next job runs in step on the same group.
        steps = []
        cancel_after_first = RunHooks(
            on_progress=lambda progress: steps.append(progress.step), should_cancel=lambda: bool(steps)
        )
        with pytest.raises(JobCancelled):
            await asyncio.to_thread(runner.run, job, [], cancel_after_first)
        again = (await asyncio.to_thread(runner.run, job, [], RunHooks())).frames
        assert np.array_equal(again, together)

        # A follower killed mid-job breaks the group at once; the next run starts a new group and makes the video.
        [follower] = ranks._group._followers
        kill_at_first_step = RunHooks(on_progress=lambda progress: os.kill(follower.pid, signal.SIGKILL))
        with pytest.raises(GroupBroken):
            await asyncio.to_thread(runner.run, job, [], kill_at_first_step)
        after = (await asyncio.to_thread(runner.run, job, [], RunHooks())).frames
        assert np.array_equal(after, together) and ranks._group._followers[0].pid != follower.pid
    finally:
        await asyncio.to_thread(ranks.close)
