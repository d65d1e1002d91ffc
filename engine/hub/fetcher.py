"""Background model downloads for the worker: a job whose model is missing waits in the queue while its model
downloads, and jobs for models already here keep running meanwhile.

A download that fails here leaves the waiting jobs to the other online workers (this one claims them no more for a
while); when none is left that has not failed to get the model too, they fail, never left queued: a worker would
claim them, find the model missing and start the download again at once, in a loop as fast as the failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from engine.errors import UserError
from engine.hub.downloads import Downloader, DownloadProgress, size_text
from engine.jobs import Progress, Stage
from engine.pipeline.models import resolve_model
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode

log = logging.getLogger(__name__)


class ModelFetcher:
    def __init__(
        self,
        queue: JobQueue,
        downloader: Downloader,
        on_ready: Callable[[], None],
        tries: int = 3,
        backoff_s: float = 30.0,
        max_backoff_s: float = 300.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        worker_id: str | None = None,
        on_unfetchable: Callable[[str], None] = lambda model: None,
    ) -> None:
        """With `worker_id`, a download that fails here fails the waiting jobs only when no other online worker is
        left to try (`on_unfetchable` tells the worker to leave the model's jobs to the others); without, at once."""
        self._worker_id = worker_id
        self._on_unfetchable = on_unfetchable
        self._queue = queue
        self._downloader = downloader
        self._on_ready = on_ready
        self._tries = tries  # for unexpected errors; the downloader retries network failures itself
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def busy_models(self) -> set[str]:
        return set(self._tasks)

    def missing(self, model_name: str, mode: Mode) -> bool:
        """True for a Hub model with no complete snapshot on disk, in a Hugging Face cache (the standard one, as other
        tools fill it, or wanbot's) or wanbot's old layout; tiny and local folders are never fetched."""
        model = resolve_model(model_name, mode)
        return not (model.is_tiny or model.is_local) and self._downloader.local_snapshot(model_name) is None

    def start(self, model_name: str) -> None:
        if model_name not in self._tasks:
            self._tasks[model_name] = asyncio.create_task(self._fetch(model_name))

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _fetch(self, model_name: str) -> None:
        latest: list[DownloadProgress] = []
        publisher = asyncio.create_task(self._publish_while_running(model_name, latest))
        try:
            await self._download(model_name, latest)
        except asyncio.CancelledError:
            log.info("download stopped model=%s (what was fetched is kept)", model_name)
        finally:
            publisher.cancel()
            self._tasks.pop(model_name, None)
            self._on_ready()

    async def _download(self, model_name: str, latest: list[DownloadProgress]) -> None:
        for attempt in range(1, self._tries + 1):
            try:
                await self._downloader.download(model_name, on_progress=latest.append)
                log.info("model downloaded model=%s", model_name)
                return
            except UserError as error:
                # The chat user cannot fix a network, a token or a disk: they are told the video cannot be made,
                # the operator reads why and what to do in the log.
                log.error("download failed model=%s: %s", model_name, error)
                await self._give_up(model_name, download_failed_text(model_name), f"download failed: {error}")
                return
            except Exception as error:
                # A bug, a broken disk, an answer nobody expected: logged once with its traceback, tried again after
                # a longer wait each time (it may pass), and after a few tries the waiting jobs are told.
                log.exception("download failed model=%s try=%s/%s", model_name, attempt, self._tries)
                if attempt == self._tries:
                    await self._give_up(
                        model_name,
                        f"Sorry, downloading the model {model_name} failed {attempt} times with an unexpected "
                        "error. Try again later; the bot's log has the details.",
                        f"download failed {attempt} times: {error!r}",
                    )
                    return
                await self._sleep(min(self._backoff_s * 2 ** (attempt - 1), self._max_backoff_s))

    async def _give_up(self, model_name: str, user_message: str, detail: str) -> None:
        """This worker cannot get the model: its waiting jobs fail, unless another online worker may still get it."""
        if self._worker_id is None:
            await self._queue.fail_waiting(model_name, user_message, detail)
            return
        failed = await self._queue.fail_waiting_unless_another_can(model_name, self._worker_id, user_message, detail)
        if failed is not None:
            return
        log.warning("model=%s could not be downloaded here; its waiting jobs are left to the other workers", model_name)
        self._on_unfetchable(model_name)
        waiting = Progress(stage=Stage.QUEUED, detail="one worker could not get the model; another will try")
        for job in await self._queue.waiting_for(model_name):
            await self._queue.show_waiting_progress(job.id, waiting)

    async def _publish_while_running(
        self, model_name: str, latest: list[DownloadProgress], every_s: float = 0.5
    ) -> None:
        """Show the newest progress to every job waiting for the model; stop the download when none is left."""
        shown: Progress | None = Progress(stage=Stage.DOWNLOADING, detail="checking which files are needed")
        while True:
            waiting = await self._queue.waiting_for(model_name)
            if not waiting:
                # Everyone who wanted this model cancelled: stop; the part files stay for the next time.
                self._tasks[model_name].cancel()
                return
            if latest:
                shown = download_progress(latest[-1])
                latest.clear()
            if shown is not None:
                for job in waiting:
                    await self._queue.show_waiting_progress(job.id, shown)
                shown = None
            await asyncio.sleep(every_s)


def download_failed_text(model_name: str) -> str:
    return (
        # What stops it (a disk, a token, a repo id, offline mode) is the admin's to fix: waiting alone does not help.
        f"Sorry, the model {model_name} could not be downloaded, so this video cannot be made. The admin has been told."
    )


def download_progress(progress: DownloadProgress) -> Progress:
    mib = 1024 * 1024
    return Progress(
        stage=Stage.DOWNLOADING,
        step=progress.done_bytes // mib,
        total=max(progress.total_bytes // mib, 1),
        eta_s=progress.eta_s,
        detail=f"{size_text(progress.done_bytes)}/{size_text(progress.total_bytes)}, "
        f"{size_text(int(progress.speed_bps))}/s",
    )
