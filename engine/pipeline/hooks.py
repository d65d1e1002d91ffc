"""How a run talks back to the worker that started it: the hooks it calls from the executor thread, and the two ways
the worker asks it to stop. Apart from generate.py, so that the weights' locator (which reports download progress
through the hooks) and the run need not import each other."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.jobs import FinishTimes, Progress

if TYPE_CHECKING:
    from engine.pipeline.previews import LivePreviews


class JobCancelled(Exception):
    """The job's owner or an admin cancelled it while it ran."""


class JobInterrupted(Exception):
    """The worker is shutting down and asked the running job to stop, to be queued again."""


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
