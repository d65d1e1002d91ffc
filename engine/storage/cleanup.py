"""Removal of stored images, videos and previews that no job needs any more.

Each remover takes the data dir's files and, given `files` (engine.storage.shared_files), their shared copies too: on
PostgreSQL those are rows of the database, and a process may hold a file's row without ever having had the file.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from engine.errors import JobNotFound
from engine.jobs import JobStatus
from engine.queue.jobqueue import JobQueue
from engine.storage.images import ImageStore
from engine.storage.shared_files import SharedFiles

# job-12-3fa9c2d1.mp4 (job-12.mp4 before names were made unique), and the copies re-encoded to fit an upload limit:
# job-12-3fa9c2d1.fit-10485760.mp4. Group 1 is the name of the video the job recorded, group 2 the job's number.
VIDEO_NAME = re.compile(r"(job-(\d+)(?:-[0-9a-f]+)?)(?:\.fit-\d+)?\.mp4")
# What engine.video writes before renaming into place, and engine.shared_files while it fetches a video; one that old
# was left by a crash mid-encode or mid-fetch.
TEMP_VIDEO_NAME = re.compile(r"\.job-\d+(?:-[0-9a-f]+)?\..+\.mp4|\.job-\d+.*\.mp4\..+\.part")
# A running job's live preview (engine.storage.preview_files.preview_path), groups as above, and its temporary name
# while written.
PREVIEW_NAME = re.compile(r"(job-(\d+))\.jpg")
TEMP_PREVIEW_NAME = re.compile(r"\.job-\d+\..+\.jpg|\.job-\d+\.jpg\..+\.part")


async def remove_unused_images(
    queue: JobQueue,
    store: ImageStore,
    retention_s: float,
    grace_s: float = 600,
    files: SharedFiles | None = None,
    last_frames_s: float | None = None,
) -> int:
    """Delete images no active or recently finished job refers to, here and in `files`; return how many went.

    Files younger than `grace_s` stay: an adapter stores an image a moment before it enqueues the job. A video's
    last frame (an Extend starts from it) stays as long as videos do (`last_frames_s`, else `retention_s`).
    """
    in_use = await queue.images_in_use(retention_s, last_frames_s)
    removed: set[str] = set()
    for sha256 in store.stored_hashes() - in_use:
        if _older_than(store.path_for(sha256), grace_s):
            store.delete(sha256)
            removed.add(sha256)
    if files is not None:
        # A legacy <sha256>.png (ImageStore.path_for) is the same image as <sha256>.
        unused = {
            name for name in await files.names("image", older_than_s=grace_s) if name.removesuffix(".png") not in in_use
        }
        await files.remove("image", unused)
        removed |= {name.removesuffix(".png") for name in unused}
    return len(removed)


async def remove_delivered_videos(
    queue: JobQueue,
    outputs_dir: Path,
    retention_s: float,
    temp_grace_s: float = 3600,
    files: SharedFiles | None = None,
) -> int:
    """Delete videos delivered more than `retention_s` ago, with their re-encoded copies, and temporary files a crash
    left behind, here and in `files`; return how many files went (a file and its shared copy count once).

    Videos not delivered yet stay, as do those given up on (`queue redeliver` sends them from the file), those of
    `wanbot generate`, which no chat delivers, and those a waiting or running Extend continues.
    """
    videos, stale_temps = await asyncio.to_thread(_scan, outputs_dir, VIDEO_NAME, TEMP_VIDEO_NAME, temp_grace_s)
    shared = _by_job(await files.names("video"), VIDEO_NAME) if files is not None else {}
    delivered = await queue.delivered_before(videos.keys() | shared.keys(), retention_s)
    for job_id in await queue.being_extended():  # a waiting or running Extend joins that video to its own
        delivered.pop(job_id, None)
    # Only the files of the video the job made: another one with its number is from a queue that started over.
    doomed = [*stale_temps]
    doomed_shared: set[str] = set()
    for job_id, video_name in delivered.items():
        doomed.extend(path for path in videos.get(job_id, []) if _video_of(path.name) == Path(video_name).stem)
        doomed_shared.update(name for name in shared.get(job_id, []) if _video_of(name) == Path(video_name).stem)
    # A worker killed between storing its video and recording the job's end left that video behind: of a job that has
    # ended, a video made after it was asked for that is not its own (nor a copy of it) is nobody's.
    ended = await queue.ended_jobs(videos.keys() | shared.keys())
    made_at = await asyncio.to_thread(lambda: {path: _made_at(path) for job in ended for path in videos.get(job, [])})
    made_at_shared = await files.stored_at("video") if files is not None else {}
    latest = time.time() - temp_grace_s
    for job_id, (asked_at, video_name) in ended.items():
        own = Path(video_name).stem
        doomed.extend(
            path
            for path in videos.get(job_id, [])
            if _video_of(path.name) != own and asked_at <= made_at[path] <= latest
        )
        doomed_shared.update(
            name
            for name in shared.get(job_id, [])
            if _video_of(name) != own and asked_at <= made_at_shared.get(name, float("inf")) <= latest
        )
    return await _remove(doomed, files, "video", doomed_shared)


async def remove_stale_previews(
    queue: JobQueue, previews_dir: Path, temp_grace_s: float = 3600, files: SharedFiles | None = None
) -> int:
    """Delete the previews of jobs that are not running, here and in `files`, and temporary files older than
    `temp_grace_s`; return how many files went (a file and its shared copy count once). The worker deletes a job's
    preview when the job ends: these were left by a crash."""
    previews, stale_temps = await asyncio.to_thread(_scan, previews_dir, PREVIEW_NAME, TEMP_PREVIEW_NAME, temp_grace_s)
    shared = _by_job(await files.names("preview"), PREVIEW_NAME) if files is not None else {}
    doomed = [*stale_temps]
    doomed_shared: set[str] = set()
    for job_id in previews.keys() | shared.keys():
        if not await _is_running(queue, job_id):
            doomed.extend(previews.get(job_id, []))
            doomed_shared.update(shared.get(job_id, []))
    return await _remove(doomed, files, "preview", doomed_shared)


async def _remove(local: list[Path], files: SharedFiles | None, kind: str, shared: set[str]) -> int:
    """Delete the local files and the shared ones; how many names went."""
    await asyncio.to_thread(_unlink_all, local)
    if files is not None and shared:
        await files.remove(kind, shared)
    return len({path.name for path in local} | shared)


def _by_job(names: set[str], pattern: re.Pattern[str]) -> dict[int, list[str]]:
    """The shared files' names by job (group 2 of `pattern`); names it does not match are not ours to judge."""
    found: dict[int, list[str]] = {}
    for name in names:
        if match := pattern.fullmatch(name):
            found.setdefault(int(match[2]), []).append(name)
    return found


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


def _made_at(path: Path) -> float:
    """When the file was written; infinitely late for one gone meanwhile (it is not removed again)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")


def _video_of(name: str) -> str:
    """The name (without .mp4) of the video a file is, or is a re-encoded copy of."""
    match = VIDEO_NAME.fullmatch(name)
    return match[1] if match else ""


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime >= seconds
    except FileNotFoundError:
        return False  # removed meanwhile by another process
