"""Rank 0's side of a parallel group as the runner uses it (engine/pipeline/hooks.py's `Ranks`): it starts the group
when a job first needs it (and a new one after a rank failed), tells the others each job, and splits every loaded
transformer over the ranks. (A follower's side is in follower.py.)"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from engine.config import Settings
from engine.jobs import Job
from engine.parallel.follower import follow
from engine.parallel.group import GroupPlan, RankGroup, check_heads, split_over_ranks

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
        self._group = RankGroup.start(self._plan, self._settings, follow)
        return True

    def announce(self, job: Job, images: list[Image.Image]) -> None:
        assert self._group is not None, "prepare() first"
        self._group.send(job, images)

    def agree(self, decision: int) -> int:
        assert self._group is not None, "prepare() first"
        return self._group.agree(decision)

    def parallelize(self, transformer: Any) -> None:
        split_over_ranks(transformer, self.size)

    def lost(self, error: BaseException) -> bool:
        return self._group is not None and self._group.lost(error)

    def check_heads(self, heads: int) -> None:
        check_heads(heads, self.size)

    def close(self) -> None:
        if self._group is None:
            return
        try:
            self._group.stop_followers()
        except Exception:  # a broken group: its followers are stopped by close
            log.warning("the parallel group's other ranks did not stop cleanly", exc_info=True)
        self._group.close()
        self._group = None
