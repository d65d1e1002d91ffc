"""Files that are whole or absent: written beside their target, fsynced, renamed into place, and the rename itself
made durable, so a crash or a power cut never leaves a partial image or video behind a database row."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (same suffix, hidden name); if the block succeeds, the file written
    there becomes `target`, else it is removed."""
    temp_path = hidden_beside(target)
    try:
        yield temp_path
        with temp_path.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_path, target)
        fsync_folder(target.parent)
    finally:
        temp_path.unlink(missing_ok=True)


def hidden_beside(target: Path) -> Path:
    """A new empty file beside `target` with a hidden temporary name (same suffix): what a clean-up of stale
    temporary files recognises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(handle)
    return Path(temp_name)


def write_atomically(target: Path, payload: bytes) -> None:
    with atomic_target(target) as temp_path:
        temp_path.write_bytes(payload)


def fsync_folder(folder: Path) -> None:
    """Make the names in `folder` durable: a rename is only on disk once its folder is synced."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def build_folder_aside(target: Path, files: Iterable[str], build: Callable[[Path], None]) -> Path:
    """`target` with `files` in it: made by `build` in a hidden folder beside it and renamed into place, unless it
    is there already (a tiny model, its stand-in weights)."""
    names = list(files)
    if all((target / name).exists() for name in names):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(staging)
        staging.rename(target)
        fsync_folder(target.parent)
    except OSError:
        # Another process finished the same folder first; theirs is as good as ours.
        if not all((target / name).exists() for name in names):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
