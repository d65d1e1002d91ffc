"""Where a running job's live preview is kept, as a file: apart from the previews' making (engine/pipeline/previews.py,
which needs torch), so that a serving process reads and removes previews without loading torch."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def preview_path(previews_dir: Path, job_id: int) -> Path:
    """Where a job's latest preview is, replaced in place (engine.storage.cleanup.PREVIEW_NAME matches it)."""
    return previews_dir / f"job-{job_id}.jpg"


def remove_preview(previews_dir: Path, job_id: int) -> None:
    """Delete a job's preview; a failure is logged and left to the clean-up's sweep."""
    try:
        preview_path(previews_dir, job_id).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove the preview of job=%s: %s", job_id, exc)
