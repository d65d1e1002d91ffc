"""The runner's view of a parallel group (engine/pipeline/hooks.py's `Ranks`): rank 0 starts the group when a job
first needs it (and a new one after a rank failed), tells the others each job, and splits every loaded transformer
over the ranks; a follower only splits and agrees."""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from engine.config import Settings
from engine.jobs import Job
from engine.parallel.group import GroupPlan, RankGroup, check_heads
from engine.parallel.seam import enable_context_parallel

log = logging.getLogger(__name__)


class LeaderRanks:
    """Rank 0, in the worker's own process."""

    def __init__(self, plan: GroupPlan, settings: Settings) -> None:
        self._plan = plan
        self._settings = settings
        self._group: RankGroup | None = None

    @property
    def size(self) -> int:
        return self._plan.size

    def prepare(self) -> bool:
        """The group, started if there is none or the last one broke; True when it is new (a pipeline loaded for
        the old one must be loaded again)."""
        if self._group is not None and not self._group.broken:
            return False
        if self._group is not None:
            log.warning("starting the parallel group again after a rank failed")
            self._group.close()
            self._group = None
        self._group = RankGroup.start(self._plan, self._settings)
        return True

    def announce(self, job: Job, images: list[Image.Image]) -> None:
        assert self._group is not None, "prepare() first"
        self._group.send(job, images)

    def agree(self, decision: int) -> int:
        assert self._group is not None, "prepare() first"
        return self._group.agree(decision)

    def parallelize(self, transformer: Any) -> None:
        check_heads(transformer.config.num_attention_heads, self.size)
        enable_context_parallel(transformer, self.size)

    def lost(self, error: BaseException) -> bool:
        return self._group is not None and self._group.lost(error)

    def close(self) -> None:
        if self._group is None:
            return
        try:
            self._group.stop_followers()
        except Exception:  # a broken group: its followers are stopped by close
            log.warning("the parallel group's other ranks did not stop cleanly", exc_info=True)
        self._group.close()
        self._group = None


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

    def parallelize(self, transformer: Any) -> None:
        check_heads(transformer.config.num_attention_heads, self.size)
        enable_context_parallel(transformer, self.size)

    def close(self) -> None:
        """The group is closed by the process that made it."""
