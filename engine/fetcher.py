"""Background model downloads for the worker: a job whose model is missing waits in the queue while its model
downloads, and jobs for models already here keep running meanwhile."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from engine.downloads import Downloader, DownloadProgress
from engine.errors import UserError
from engine.images import Mode
from engine.jobs import Progress, Stage
from engine.models import resolve_model
from engine.queue import JobQueue

log = logging.getLogger(__name__)


class ModelFetcher:
    def __init__(self, queue: JobQueue, downloader: Downloader, on_ready: Callable[[], None]) -> None:
        self._queue = queue
        self._downloader = downloader
        self._on_ready = on_ready
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def busy_models(self) -> set[str]:
        return set(self._tasks)

    def missing(self, model_name: str, mode: Mode) -> bool:
        """True for a Hub model with no complete snapshot on disk (tiny and local folders are never fetched)."""
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
            await self._downloader.download(model_name, on_progress=latest.append)
            log.info("model downloaded model=%s", model_name)
        except UserError as error:
            await self._queue.fail_waiting(model_name, str(error), f"download failed: {error}")
        except asyncio.CancelledError:
            log.info("download stopped model=%s (what was fetched is kept)", model_name)
        finally:
            publisher.cancel()
            self._tasks.pop(model_name, None)
            self._on_ready()

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
                    await self._queue.update_progress(job.id, shown, persist=False)
                shown = None
            await asyncio.sleep(every_s)


def download_progress(progress: DownloadProgress) -> Progress:
    mib = 1024 * 1024
    return Progress(
        stage=Stage.DOWNLOADING,
        step=progress.done_bytes // mib,
        total=max(progress.total_bytes // mib, 1),
        eta_s=progress.eta_s,
        detail=f"{progress.done_bytes / 1e9:.2f}/{progress.total_bytes / 1e9:.2f} GB, "
        f"{progress.speed_bps / 1e6:.1f} MB/s",
    )
