"""Removal of stored images, videos and previews that no job needs any more."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from engine.errors import JobNotFound
from engine.images import ImageStore
from engine.jobs import JobStatus
from engine.queue import JobQueue

# job-12-3fa9c2d1.mp4 (job-12.mp4 before names were made unique), and the copies re-encoded to fit an upload limit:
# job-12-3fa9c2d1.fit-10485760.mp4. Group 1 is the name of the video the job recorded, group 2 the job's number.
VIDEO_NAME = re.compile(r"(job-(\d+)(?:-[0-9a-f]+)?)(?:\.fit-\d+)?\.mp4")
# What engine.video writes before renaming into place; one that old was left by a crash mid-encode.
TEMP_VIDEO_NAME = re.compile(r"\.job-\d+\..+\.mp4")
# A running job's live preview (engine.previews.preview_path), groups as above, and its temporary name while written.
PREVIEW_NAME = re.compile(r"(job-(\d+))\.jpg")
TEMP_PREVIEW_NAME = re.compile(r"\.job-\d+\..+\.jpg")


async def remove_unused_images(queue: JobQueue, store: ImageStore, retention_s: float, grace_s: float = 600) -> int:
    """Delete images no active or recently finished job refers to; return how many went.

    Files younger than `grace_s` stay: an adapter stores an image a moment before it enqueues the job.
    """
    in_use = await queue.images_in_use(retention_s)
    removed = 0
    for sha256 in store.stored_hashes() - in_use:
        if _older_than(store.path_for(sha256), grace_s):
            store.delete(sha256)
            removed += 1
    return removed


async def remove_delivered_videos(
    queue: JobQueue, outputs_dir: Path, retention_s: float, temp_grace_s: float = 3600
) -> int:
    """Delete videos delivered more than `retention_s` ago, with their re-encoded copies, and temporary files a crash
    left behind; return how many files went.

    Videos not delivered yet stay, as do those given up on (`queue redeliver` sends them from the file) and those of
    `wanbot generate`, which no chat delivers.
    """
    videos, stale_temps = await asyncio.to_thread(_scan, outputs_dir, VIDEO_NAME, TEMP_VIDEO_NAME, temp_grace_s)
    delivered = await queue.delivered_before(videos, retention_s)
    # Only the files of the video the job made: another one with its number is from a queue that started over.
    doomed = [*stale_temps]
    for job_id, video_name in delivered.items():
        doomed.extend(path for path in videos[job_id] if _video_of(path) == Path(video_name).stem)
    await asyncio.to_thread(_unlink_all, doomed)
    return len(doomed)


async def remove_stale_previews(queue: JobQueue, previews_dir: Path, temp_grace_s: float = 3600) -> int:
    """Delete the previews of jobs that are not running, and temporary files older than `temp_grace_s`; return how
    many files went. The worker deletes a job's preview when the job ends: these were left by a crash."""
    previews, stale_temps = await asyncio.to_thread(_scan, previews_dir, PREVIEW_NAME, TEMP_PREVIEW_NAME, temp_grace_s)
    doomed = [*stale_temps]
    for job_id, paths in previews.items():
        if not await _is_running(queue, job_id):
            doomed.extend(paths)
    await asyncio.to_thread(_unlink_all, doomed)
    return len(doomed)


async def _is_running(queue: JobQueue, job_id: int) -> bool:
    try:
        return (await queue.get(job_id)).status is JobStatus.RUNNING
    except JobNotFound:
        return False  # a database started over


def _scan(
    folder: Path, name: re.Pattern[str], temp_name: re.Pattern[str], temp_grace_s: float
) -> tuple[dict[int, list[Path]], list[Path]]:
    """Each job's files in `folder` (group 2 of `name` is the job's number), and temporary files older than
    `temp_grace_s`."""
    files: dict[int, list[Path]] = {}
    stale_temps: list[Path] = []
    for path in folder.iterdir() if folder.is_dir() else []:
        if match := name.fullmatch(path.name):
            files.setdefault(int(match[2]), []).append(path)
        elif temp_name.fullmatch(path.name) and _older_than(path, temp_grace_s):
            stale_temps.append(path)
    return files, stale_temps


def _video_of(path: Path) -> str:
    """The name (without .mp4) of the video a file is, or is a re-encoded copy of."""
    match = VIDEO_NAME.fullmatch(path.name)
    return match[1] if match else ""


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime >= seconds
    except FileNotFoundError:
        return False  # removed meanwhile by another process
