"""Removal of stored images that no job needs any more."""

from __future__ import annotations

import time

from engine.images import ImageStore
from engine.queue import JobQueue


async def remove_unused_images(queue: JobQueue, store: ImageStore, retention_s: float, grace_s: float = 600) -> int:
    """Delete images no active or recently finished job refers to; return how many went.

    Files younger than `grace_s` stay: an adapter stores an image a moment before it enqueues the job.
    """
    in_use = await queue.images_in_use(retention_s)
    removed = 0
    for sha256 in store.stored_hashes() - in_use:
        try:
            age_s = time.time() - store.path_for(sha256).stat().st_mtime
        except FileNotFoundError:
            continue  # removed meanwhile by another process
        if age_s >= grace_s:
            store.delete(sha256)
            removed += 1
    return removed
