"""How a run talks back to the worker that started it: the hooks it calls from the executor thread, and the two ways
the worker asks it to stop. Apart from generate.py, so that the weights' locator (which reports download progress
through the hooks) and the run need not import each other."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.jobs import FinishTimes, Job, Progress

if TYPE_CHECKING:
    from engine.pipeline.previews import LivePreviews


class JobCancelled(Exception):
    """The job's owner or an admin cancelled it while it ran."""


class JobInterrupted(Exception):
    """The worker is shutting down and asked the running job to stop, to be queued again."""


class GroupBroken(RuntimeError):
    """A rank of a parallel group died, hung past the timeout, or failed out of step: the job goes back to the queue
    and the group is started again for the next one."""


# What the ranks of a parallel group agree on after each step, by rank 0's word (RunHooks.agree).
GO_ON, INTERRUPT, CANCEL, TIMED_OUT = 0, 1, 2, 3


class Ranks(Protocol):
    """A parallel group as the runner uses it (engine/parallel/ranks.py): one video on several devices."""

    @property
    def size(self) -> int: ...

    def prepare(self) -> bool:
        """Rank 0: the group started (again, after a failure); True when it is new and the pipeline must reload."""
        ...

    def announce(self, job: Job, images: list[Any]) -> None:
        """Rank 0: the job and its pictures to the other ranks, before it runs."""
        ...

    def agree(self, decision: int) -> int: ...

    def lost(self, error: BaseException) -> bool:
        """Whether `error` (raised by a run) means a rank is gone: the group is then broken."""
        ...

    def check_heads(self, heads: int) -> None:
        """A UserError where the ranks cannot share a model's attention heads evenly."""
        ...

    def parallelize(self, transformer: Any) -> None:
        """Split a loaded transformer over the ranks (every rank alike)."""
        ...

    def close(self) -> None: ...


@dataclass
class RunHooks:
    """How a run reports back and learns it should stop; every callable is called from the executor thread."""

    on_progress: Callable[[Progress], None] = lambda progress: None
    should_cancel: Callable[[], bool] = lambda: False
    should_interrupt: Callable[[], bool] = lambda: False
    timeout_s: float = float("inf")
    clock: Callable[[], float] = time.monotonic
    previews: LivePreviews | None = None  # watches the transformers while the pipeline denoises
    finish: FinishTimes | None = None  # the decode and encode expected after the last step; None: not known yet
    # Where the run may write the MP4 while the VAE decodes (without metadata: the worker adds it); None: it may not.
    encode_to: Path | None = None
    # A parallel group's agreement after each step (rank 0's decision for all); alone, the decision itself.
    agree: Callable[[int], int] = lambda decision: decision
    # False on a follower rank: the VAE decode is rank 0's alone (but for a t2v loop's first pass, whose first frame
    # every rank's second pass starts from).
    decode: bool = True
