"""The files a job needs or makes, where every process that takes part can get them.

On SQLite the serving process and its workers share one machine, so a file's path is all they need: `LocalFiles`.
On PostgreSQL a worker may run anywhere with nothing but the database URL, so the start and end images, the finished
video and the live preview travel through the database: `DatabaseFiles` keeps each file as a row of stored_files
(its sha256, size and number of chunks) and its bytes in stored_file_chunks, CHUNK_BYTES a row. Files are streamed a
chunk at a time both ways, so a video never sits whole in memory, and checked against their hash when read.

A file is named by its kind and its local file name: ("image", sha256), ("video", "job-12-3fa9c2d1.mp4"),
("preview", "job-12.jpg"); its row is named "kind/name".
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Protocol

from engine.errors import ImageIntegrityError, UserError
from engine.queue.backend import Backend, Row, Tx
from engine.queue.jobqueue import JobQueue
from engine.queue.postgres import PostgresBackend
from engine.storage.files import fsync_folder

# Big enough that a video is a few dozen rows, small enough that one row is cheap to hold, send and hash.
CHUNK_BYTES = 1 << 20
KINDS = ("image", "video", "preview")
# What to do when a file cannot be had, by kind.
_HINTS = {
    "image": "Send the picture again with a new job.",
    "video": "Generate the video again with a new job.",
    "preview": "Wait for the next preview.",
}


class SharedFiles(Protocol):
    async def publish(self, kind: str, path: Path) -> None:
        """Make the local file `path` available to every process as (kind, path.name), replacing any earlier one."""
        ...

    async def ensure_local(self, kind: str, path: Path) -> Path:
        """`path`, fetched first if this machine lacks it; UserError if nobody has it or its copy is damaged."""
        ...

    async def has(self, kind: str, path: Path) -> bool:
        """Whether `path` could be had (ensure_local) without fetching it: on this machine, or in the shared copy."""
        ...

    async def read(self, kind: str, name: str) -> bytes | None:
        """A small shared file's bytes (a preview), None if there is no shared copy."""
        ...

    async def remove(self, kind: str, names: Iterable[str]) -> int:
        """Delete the shared copies of these files; how many there were."""
        ...

    async def names(self, kind: str, older_than_s: float = 0.0) -> set[str]:
        """The names of the shared files of `kind` stored at least `older_than_s` ago."""
        ...

    async def stored_at(self, kind: str) -> dict[str, float]:
        """When each shared file of `kind` was stored (none where the data dir is the shared copy)."""
        ...


async def local_video(files: SharedFiles, outputs_dir: Path, made: Path) -> Path:
    """A job's video on this machine: where its worker wrote it, or (a worker on another machine) fetched from the
    database into `outputs_dir` under its own name. UserError (or OSError) when it cannot be had."""
    if await asyncio.to_thread(made.is_file):
        return made
    return await files.ensure_local("video", outputs_dir / made.name)


def shared_files(queue: JobQueue) -> SharedFiles:
    """Where this queue's processes share files: the database when it is PostgreSQL, else the data dir."""
    backend = queue.database
    return DatabaseFiles(backend) if isinstance(backend, PostgresBackend) else LocalFiles()


class LocalFiles:
    """Every process sees the same data dir: the file at its path is the shared copy, and there is no other."""

    async def publish(self, kind: str, path: Path) -> None:
        _check(kind, path.name)

    async def ensure_local(self, kind: str, path: Path) -> Path:
        _check(kind, path.name)
        if await asyncio.to_thread(path.exists):
            return path
        raise _missing(kind, path.name)

    async def has(self, kind: str, path: Path) -> bool:
        _check(kind, path.name)
        return await asyncio.to_thread(path.is_file)

    async def read(self, kind: str, name: str) -> bytes | None:
        _check(kind, name)
        return None

    async def remove(self, kind: str, names: Iterable[str]) -> int:
        return 0

    async def names(self, kind: str, older_than_s: float = 0.0) -> set[str]:
        _check(kind, "")
        return set()

    async def stored_at(self, kind: str) -> dict[str, float]:
        _check(kind, "")
        return {}


class DatabaseFiles:
    """Files in the job database (PostgreSQL), a chunk a row.

    A reader locks the file's row FOR SHARE for as long as it reads the chunks, and a writer takes the same row
    FOR UPDATE (by its upsert or delete): a reader sees one whole version of a file, never chunks of two."""

    def __init__(self, db: Backend) -> None:
        self._db = db

    async def publish(self, kind: str, path: Path) -> None:
        key = _key(kind, path.name)
        digest = hashlib.sha256()
        size = chunks = 0
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            async with self._db.transaction() as tx:
                # The upsert locks the row: two processes publishing one name take turns, readers wait for the end.
                await tx.run(
                    """INSERT INTO stored_files (name, sha256, bytes, chunks, stored_at) VALUES (?, '', 0, 0, ?)
                       ON CONFLICT (name) DO UPDATE SET sha256 = '', bytes = 0, chunks = 0""",
                    key,
                    time.time(),
                )
                await tx.run("DELETE FROM stored_file_chunks WHERE name = ?", key)
                while data := await asyncio.to_thread(_read_chunk, handle, digest):
                    await tx.run("INSERT INTO stored_file_chunks (name, seq, data) VALUES (?, ?, ?)", key, chunks, data)
                    size += len(data)
                    chunks += 1
                await tx.run(
                    "UPDATE stored_files SET sha256 = ?, bytes = ?, chunks = ?, stored_at = ? WHERE name = ?",
                    digest.hexdigest(),
                    size,
                    chunks,
                    time.time(),
                    key,
                )
        finally:
            await asyncio.to_thread(handle.close)

    async def ensure_local(self, kind: str, path: Path) -> Path:
        key = _key(kind, path.name)
        if await asyncio.to_thread(path.exists):
            return path
        async with self._db.transaction() as tx:
            stored = await _lock_for_reading(tx, key)
            if stored is None:
                raise _missing(kind, path.name)
            temp, handle = await asyncio.to_thread(_open_temp, path)
            try:
                digest = hashlib.sha256()
                size = 0
                for seq in range(stored["chunks"]):
                    row = await tx.one("SELECT data FROM stored_file_chunks WHERE name = ? AND seq = ?", key, seq)
                    if row is None:
                        raise _damaged(kind, path.name)
                    await asyncio.to_thread(_write_chunk, handle, row["data"], digest)
                    size += len(row["data"])
                if size != stored["bytes"] or digest.hexdigest() != stored["sha256"]:
                    raise _damaged(kind, path.name)
                await asyncio.to_thread(_put_in_place, handle, temp, path)
            finally:
                await asyncio.to_thread(_discard, handle, temp)
        return path

    async def read(self, kind: str, name: str) -> bytes | None:
        key = _key(kind, name)
        async with self._db.transaction() as tx:
            stored = await _lock_for_reading(tx, key)
            if stored is None:
                return None
            rows = await tx.all("SELECT data FROM stored_file_chunks WHERE name = ? ORDER BY seq", key)
        data = b"".join(row["data"] for row in rows)
        valid = len(rows) == stored["chunks"] and len(data) == stored["bytes"]
        if not valid or hashlib.sha256(data).hexdigest() != stored["sha256"]:
            raise _damaged(kind, name)
        return data

    async def remove(self, kind: str, names: Iterable[str]) -> int:
        keys = [_key(kind, name) for name in names]
        if not keys:
            return 0
        async with self._db.transaction() as tx:
            # The chunks go with their file (ON DELETE CASCADE).
            return await tx.run("DELETE FROM stored_files WHERE name = ANY(?::text[])", keys)

    async def has(self, kind: str, path: Path) -> bool:
        if await asyncio.to_thread(path.is_file):
            return True
        async with self._db.reading() as tx:
            return await tx.one("SELECT 1 FROM stored_files WHERE name = ?", _key(kind, path.name)) is not None

    async def names(self, kind: str, older_than_s: float = 0.0) -> set[str]:
        prefix = _key(kind, "")
        async with self._db.reading() as tx:
            rows = await tx.all(
                "SELECT name FROM stored_files WHERE name LIKE ? AND stored_at <= ?",
                f"{prefix}%",
                time.time() - older_than_s,
            )
        return {row["name"].removeprefix(prefix) for row in rows}

    async def stored_at(self, kind: str) -> dict[str, float]:
        prefix = _key(kind, "")
        async with self._db.reading() as tx:
            rows = await tx.all("SELECT name, stored_at FROM stored_files WHERE name LIKE ?", f"{prefix}%")
        return {row["name"].removeprefix(prefix): float(row["stored_at"]) for row in rows}


async def _lock_for_reading(tx: Tx, key: str) -> Row | None:
    """The file's sha256, bytes and chunks, its row locked until the transaction ends; None if there is no such file.
    A file being published for the first time is not there until its publisher commits."""
    return await tx.one("SELECT sha256, bytes, chunks FROM stored_files WHERE name = ? FOR SHARE", key)


def _check(kind: str, name: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of shared file {kind!r}; one of {', '.join(KINDS)}")
    if "/" in name or name in (".", ".."):
        raise ValueError(f"a shared file's name is a file name, not a path: {name!r}")


def _key(kind: str, name: str) -> str:
    _check(kind, name)
    return f"{kind}/{name}"


def _missing(kind: str, name: str) -> UserError:
    error = ImageIntegrityError if kind == "image" else UserError
    return error(f"The {kind} {name} is neither on this machine nor in the job database.", _HINTS[kind])


def _damaged(kind: str, name: str) -> UserError:
    error = ImageIntegrityError if kind == "image" else UserError
    return error(f"The copy of the {kind} {name} in the job database is damaged: its bytes do not match.", _HINTS[kind])


def _read_chunk(handle: IO[bytes], digest: hashlib._Hash) -> bytes:
    data = handle.read(CHUNK_BYTES)
    digest.update(data)
    return data


def _open_temp(target: Path) -> tuple[Path, IO[bytes]]:
    # Hidden, beside its target (the rename stays on one file system); clean-up sweeps one a crash left behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    return Path(name), os.fdopen(descriptor, "wb")


def _write_chunk(handle: IO[bytes], data: bytes, digest: hashlib._Hash) -> None:
    handle.write(data)
    digest.update(data)


def _put_in_place(handle: IO[bytes], temp: Path, target: Path) -> None:
    # Whole or absent, as engine.files writes: synced before the rename, the rename synced after.
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(temp, target)
    fsync_folder(target.parent)


def _discard(handle: IO[bytes], temp: Path) -> None:
    handle.close()
    temp.unlink(missing_ok=True)
