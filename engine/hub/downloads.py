"""Model downloads that survive real networks, on top of the Hub's HTTP API.

huggingface_hub resumes only within one call, does not retry resets or 5xx on file bodies and leaves some metadata
calls without a timeout (../shared/REFERENCE.md). So this module plans first (pinned commit, only the files the
pipeline needs, exact sizes, what is already here), checks the disk, then fetches each file into a part file that
a later run continues with a Range request, retrying with backoff, and verifies size and sha256 (or git blob id).
Files whose content already exists (the same text encoder or VAE in another repo) are linked, not downloaded again.

Everything is written in the Hugging Face cache layout (engine/hub/hfcache.py), so huggingface_hub, diffusers and
`huggingface-cli` read wanbot's downloads as their own and wanbot uses theirs: a snapshot already in the standard
cache is used where it is, and one that is partial is completed there, only its missing files fetched. The part file
of a blob is `blobs/<etag>.incomplete`, a name huggingface_hub never writes (its own temporary files carry a random
suffix). Models downloaded before this layout (`hub/owner--name/<commit>` under the models folder) are still found.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import get_token

from engine.config import DownloadsConfig, Settings
from engine.errors import UserError, quoted
from engine.hub.hfcache import (
    GIT_OID,
    SHA256,
    file_sha256,
    files_snapshot,
    git_blob_id,
    hub_cache,
    link_or_copy,
    link_snapshot_file,
    pipeline_snapshot,
    repo_folder,
    select_files,
)
from engine.pipeline.models import resolve_model
from engine.storage.files import fsync_folder, write_atomically
from engine.storage.images import Mode

PART_SUFFIX = ".incomplete"
MOVE_HINT = (
    "Free some space, or set downloads.cache_dir (or move data_dir, WANBOT_DATA_DIR, where it lies by default) to a "
    "larger disk"
)
# Without a network every metadata request waits for its timeout and its retries: minutes before anyone is told.
# One request with this limit answers in seconds whether the Hub can be reached at all.
PROBE_TIMEOUT_S = 5.0
# How long `models list` and `wanbot run` wait for the Hub to say what a model still needs.
CHECK_LIMIT_S = 10.0
# The Hub's own rule (huggingface_hub's validate_repo_id): owner/name, each of ASCII letters, digits, '-', '_' and
# '.', beginning and ending with a letter, digit or '_', at most 96 characters; no '--' or '..', no '.git' at the end.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID_PATTERN = re.compile(rf"{_REPO_PART}/{_REPO_PART}")


@dataclass
class PlannedFile:
    path: str
    size: int
    sha256: str | None  # LFS files carry one; small git files are checked by size and git blob id
    etag: str  # the blob's name in the cache: the sha256 of an LFS file, the git blob id of a small one
    present_bytes: int = 0  # already on disk (complete file, or the part a killed run left)

    @property
    def missing_bytes(self) -> int:
        return self.size - self.present_bytes


@dataclass
class DownloadPlan:
    repo_id: str
    revision: str
    commit: str
    folder: Path  # snapshots/<commit> in the cache the download completes
    files: list[PlannedFile]
    whole_pipeline: bool  # every file the pipeline loads, not a few chosen ones (a LoRA pair)

    @property
    def repo_folder(self) -> Path:
        return self.folder.parents[1]

    @property
    def cache(self) -> Path:
        return self.folder.parents[2]

    def blob(self, item: PlannedFile) -> Path:
        return self.repo_folder / "blobs" / item.etag

    def part(self, item: PlannedFile) -> Path:
        return self.repo_folder / "blobs" / f"{item.etag}{PART_SUFFIX}"

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.files)

    @property
    def missing_bytes(self) -> int:
        return sum(item.missing_bytes for item in self.files)


@dataclass
class DownloadProgress:
    done_bytes: int
    total_bytes: int
    speed_bps: float
    eta_s: float | None
    current_file: str


ProgressCallback = Callable[[DownloadProgress], None]


@dataclass
class ToDownload:
    """What a repo still needs from the Hub: its size, or why that could not be checked."""

    repo_id: str
    missing_bytes: int | None = None
    not_checked: str = ""


class TransientError(Exception):
    """Worth another try: a network error, a reset, a stall, 5xx or 429 (with the delay the server asked for)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass
class _Reservations:
    """Bytes promised to downloads running in this process, so two of them do not both count the same free space."""

    by_repo: dict[str, int] = field(default_factory=dict)

    def others(self, repo_id: str) -> int:
        return sum(size for repo, size in self.by_repo.items() if repo != repo_id)


RESERVATIONS = _Reservations()


class Downloader:
    def __init__(
        self,
        root: Path,
        config: DownloadsConfig,
        free_bytes: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.root = root  # the models folder, where the old layout lies
        self.cache = (config.cache_dir or root / "hub").expanduser()
        # Searched for snapshots and blobs: wanbot's own cache first, then the standard one other tools fill.
        self._caches = list(dict.fromkeys([self.cache, hub_cache()]))
        self._config = config
        self._free_bytes = free_bytes
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock  # for Retry-After dates, which name a moment, not a duration
        self._probe_timeout_s = probe_timeout_s
        self._endpoint = config.endpoint.rstrip("/")
        token = os.environ.get("HF_TOKEN") or get_token()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    # -- where things are --------------------------------------------------------------------------------------

    def local_snapshot(self, repo_id: str, revision: str = "main") -> Path | None:
        """A complete snapshot of the pipeline at `revision`, in a Hugging Face cache or the old layout, or None."""
        for cache in self._caches:
            if found := pipeline_snapshot(cache, repo_id, revision):
                return found
        old = self._old_snapshot(repo_id)
        return old if old is not None and (old / "model_index.json").exists() else None

    def local_files(self, repo_id: str, files: list[str], revision: str = "main") -> Path | None:
        """The snapshot holding every one of `files` (a LoRA pair, say), or None."""
        for cache in self._caches:
            if found := files_snapshot(cache, repo_id, files, revision):
                return found
        old = self._old_snapshot(repo_id)
        return old if old is not None and all((old / name).is_file() for name in files) else None

    def _old_snapshot(self, repo_id: str) -> Path | None:
        """Where wanbot kept a download before the shared layout: hub/owner--name/<commit>, named by `current`."""
        marker = self.root / "hub" / repo_id.replace("/", "--") / "current"
        return marker.parent / marker.read_text().strip() if marker.is_file() else None

    def _home(self, repo_id: str) -> Path:
        """The cache a download of `repo_id` completes: one already holding part of it (a snapshot another tool
        began) where wanbot may write, so its files are not fetched or copied again; else downloads.cache_dir."""
        for cache in self._caches:
            folder = repo_folder(cache, repo_id)
            if folder.is_dir() and os.access(folder, os.W_OK):
                return cache
        return self.cache

    def _existing_blob(self, item: PlannedFile) -> Path | None:
        """The same content already on this machine: in any repo of the caches (the same text encoder or VAE in
        another Wan repo), or in the old layout's store."""
        found = [blob for cache in self._caches for blob in cache.glob(f"models--*/blobs/{item.etag}")]
        found.append(self.root / "blobs" / item.etag)
        return next((blob for blob in found if blob.is_file() and blob.stat().st_size == item.size), None)

    # -- planning ----------------------------------------------------------------------------------------------

    async def plan(self, repo_id: str, revision: str = "main", files: list[str] | None = None) -> DownloadPlan:
        """Pin the commit and list the files the pipeline needs (or just `files`, for a repo that is no pipeline,
        such as a LoRA collection), with sizes and what is already here."""
        check_repo_id(repo_id)
        if self._config.offline:
            raise UserError(
                f"The model {repo_id} is not on disk and downloads are off (offline mode).",
                "Turn downloads.offline off, or put the model folder on this machine.",
            )
        await self.check_reachable()
        async with self._client(self._config.metadata_timeout_s) as client:
            what = "the model's revision"
            info = await self._json(client, f"/api/models/{repo_id}/revision/{revision}", repo_id, what)
            commit = info.get("sha") if isinstance(info, dict) else None
            if not isinstance(commit, str) or not GIT_OID.fullmatch(commit):  # it names a folder: nothing else may
                raise self._unexpected(repo_id, what, "an answer without a commit sha")
            what = "the model's file list"
            tree = await self._json(client, f"/api/models/{repo_id}/tree/{commit}?recursive=true", repo_id, what)
            index = None
            if files is None:
                what = "model_index.json"
                index = await self._json(client, f"/{repo_id}/resolve/{commit}/model_index.json", repo_id, what)
        if files is None and not isinstance(index, dict):
            raise self._unexpected(repo_id, "model_index.json", "something that is not a JSON object")
        try:
            # A repo of single files (LoRAs) is no pipeline: the files asked for are checked below instead.
            entries = tree_files(tree, required="model_index.json" if files is None else None)
        except ValueError as error:
            raise self._unexpected(repo_id, "the model's file list", str(error)) from None
        if files is not None and (absent := [name for name in files if name not in entries]):
            raise UserError(
                f"{repo_id} has no file {', '.join(absent)}.",
                "Check the file names in the configuration (models.fast_loras) against the repo's file list.",
            )
        folder = repo_folder(self._home(repo_id), repo_id) / "snapshots" / commit
        chosen = files if files is not None else select_files(index or {}, list(entries))
        plan = DownloadPlan(repo_id, revision, commit, folder, [entries[path] for path in chosen], files is None)
        for item in plan.files:
            item.present_bytes = self._present_bytes(plan, item)
        return plan

    async def check_reachable(self) -> None:
        """One request with a short limit: any HTTP answer means the Hub (or a proxy in its place) is there."""
        try:
            async with httpx.AsyncClient(timeout=self._probe_timeout_s) as client:
                await asyncio.wait_for(client.head(f"{self._endpoint}/"), self._probe_timeout_s)
        except (httpx.TimeoutException, TimeoutError):
            reason = f"no answer within {self._probe_timeout_s:g} s"
        except (httpx.TransportError, httpx.InvalidURL, OSError) as error:
            reason = str(error) or type(error).__name__
        else:
            return
        raise UserError(
            f"The Hub at {self._endpoint} cannot be reached from here ({reason}).",
            "Check the network or HF_ENDPOINT (downloads.endpoint), or use a local model folder.",
        )

    async def sizes_to_download(
        self, repo_ids: list[str], limit_s: float = CHECK_LIMIT_S, files: dict[str, list[str]] | None = None
    ) -> list[ToDownload]:
        """Ask the Hub briefly what each repo still needs (of a repo in `files`, only those files); one it could
        not check says why instead of a size."""
        if self._config.offline:
            return [ToDownload(repo_id, not_checked="downloads are off (offline mode)") for repo_id in repo_ids]
        try:
            await self.check_reachable()
        except UserError:
            return [ToDownload(repo_id, not_checked="the Hub cannot be reached") for repo_id in repo_ids]

        async def one(repo_id: str) -> ToDownload:
            try:
                wanted = (files or {}).get(repo_id)
                plan = await asyncio.wait_for(self.plan(repo_id, files=wanted), limit_s)
            except TimeoutError:
                return ToDownload(repo_id, not_checked=f"the Hub did not answer within {limit_s:g} s")
            except UserError as error:
                return ToDownload(repo_id, not_checked=error.message)
            return ToDownload(repo_id, plan.missing_bytes)

        return list(await asyncio.gather(*(one(repo_id) for repo_id in repo_ids)))

    def _unexpected(self, repo_id: str, what: str, problem: str) -> UserError:
        # Often not the Hub at all: a proxy's login page, a captive portal, a mirror that does not serve the API.
        return UserError(
            f"The Hub at {self._endpoint} answered {what} of {repo_id} with {problem}.",
            "Check downloads.endpoint (HF_ENDPOINT): it must be a Hugging Face Hub or a mirror of its API, not a web "
            "page or a proxy that asks to log in.",
        )

    def _present_bytes(self, plan: DownloadPlan, item: PlannedFile) -> int:
        if _complete(plan.folder / item.path, item) or self._existing_blob(item) is not None:
            return item.size  # here, or the same content elsewhere that will be linked
        part = plan.part(item)
        return min(part.stat().st_size, item.size) if part.exists() else 0

    # -- downloading -------------------------------------------------------------------------------------------

    async def download(
        self,
        repo_id: str,
        revision: str = "main",
        on_progress: ProgressCallback | None = None,
        files: list[str] | None = None,
    ) -> Path:
        """Make the repo's snapshot (or just `files` of it) complete on disk and return its folder. Cancelling keeps
        what was fetched."""
        check_repo_id(repo_id)  # before its folder is made: "../x" is no folder name either
        # Beside huggingface_hub's own locks (one a blob), where its cache scan does not look.
        lock_path = repo_folder(self._home(repo_id) / ".locks", repo_id) / "wanbot.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("w") as lock:
            # One downloader per model, across processes too; a second waits and then finds the files present.
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            try:
                plan = await self.plan(repo_id, revision, files)
                self._check_disk(plan)
                RESERVATIONS.by_repo[repo_id] = plan.missing_bytes
                try:
                    await self._fetch_all(plan, on_progress)
                finally:
                    RESERVATIONS.by_repo.pop(repo_id, None)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return plan.folder

    def _check_disk(self, plan: DownloadPlan) -> None:
        plan.cache.mkdir(parents=True, exist_ok=True)
        free = self._free_bytes(plan.cache)
        needed = plan.missing_bytes + self._config.reserve_bytes + RESERVATIONS.others(plan.repo_id)
        if needed > free:
            raise UserError(
                f"Not enough disk space for {plan.repo_id}: it needs {size_text(plan.missing_bytes)} more (plus "
                f"{size_text(self._config.reserve_bytes)} kept free and "
                f"{size_text(RESERVATIONS.others(plan.repo_id))} for other downloads), but only "
                f"{size_text(free)} are free in {plan.cache}.",
                f"{MOVE_HINT}.",
            )

    async def _fetch_all(self, plan: DownloadPlan, on_progress: ProgressCallback | None) -> None:
        meter = _Meter(plan.total_bytes, sum(item.present_bytes for item in plan.files), self._clock, on_progress)
        try:
            await self._fetch_files(plan, meter)
        except OSError as error:
            # The space checked at the start can be taken by anything meanwhile; the part files stay for the next run.
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(
                f"The disk holding {plan.cache} filled up while downloading {plan.repo_id}: it needs "
                f"{size_text(meter.remaining_bytes)} more (plus {size_text(self._config.reserve_bytes)} kept free).",
                f"{MOVE_HINT}, then run the download again: it continues from what was fetched.",
            ) from None

    async def _fetch_files(self, plan: DownloadPlan, meter: _Meter) -> None:
        async with self._client(self._config.timeout_s) as client:
            for item in plan.files:
                if _complete(plan.folder / item.path, item):
                    continue
                if not await asyncio.to_thread(self._reuse_blob, plan, item):
                    await self._fetch_file(client, plan, item, meter)
                link_snapshot_file(plan.blob(item), plan.folder / item.path)
        if plan.whole_pipeline:
            self._clean_partials(plan)
        if plan.revision != plan.commit:
            # Last: huggingface_hub and wanbot read a branch's snapshot through this, and it is complete now.
            write_atomically(plan.repo_folder / "refs" / plan.revision, plan.commit.encode())

    def _reuse_blob(self, plan: DownloadPlan, item: PlannedFile) -> bool:
        """Put content already on this machine in place of a download: a hard link, or a copy across disks."""
        found = self._existing_blob(item)
        if found is None:
            return False
        if found != plan.blob(item):
            link_or_copy(found, plan.blob(item))
        return True

    async def _fetch_file(
        self, client: httpx.AsyncClient, plan: DownloadPlan, item: PlannedFile, meter: _Meter
    ) -> None:
        part = plan.part(item)
        part.parent.mkdir(parents=True, exist_ok=True)
        url = f"/{plan.repo_id}/resolve/{plan.commit}/{item.path}"
        failures = 0  # in a row, with no byte arriving in between
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > item.size:
                part.unlink()
                have = 0
            try:
                if have < item.size:
                    await self._stream(client, url, part, have, item, meter)
                break
            except TransientError as error:
                # A 50 GB file may lose its connection many times over hours and still be moving: only failures
                # without progress use up the retries.
                if part.exists() and part.stat().st_size > have:
                    failures = 0
                if failures == self._config.retries:
                    raise UserError(
                        f"Downloading {plan.repo_id} failed {failures + 1} times in a row ({error}).",
                        "Check the network and try again; what was fetched is kept.",
                    ) from error
                await self._sleep(self._backoff(failures, error.retry_after_s))
                failures += 1
        # In a thread: hashing a 57 GB expert takes minutes, and the bot's event loop must keep answering chats.
        await asyncio.to_thread(self._verify, part, item, plan.repo_id)
        os.replace(part, plan.blob(item))
        fsync_folder(part.parent)

    async def _stream(
        self, client: httpx.AsyncClient, url: str, part: Path, have: int, item: PlannedFile, meter: _Meter
    ) -> None:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            async with client.stream("GET", url, headers=headers) as response:
                self._raise_for_status(response, item.path)
                if have and response.status_code != 206:
                    have = 0  # the server ignored the range: start the file again
                # Unbuffered, and written as it arrives: every byte received is in the OS's hands at once, so a
                # process killed at any moment leaves a part file the next run continues from.
                with part.open("r+b" if have else "wb", buffering=0) as handle:
                    handle.seek(have)
                    handle.truncate()
                    async for chunk in response.aiter_bytes():
                        _write_all(handle, chunk)
                        meter.add(len(chunk), item.path)
                    await asyncio.to_thread(os.fsync, handle.fileno())
                    written = handle.tell()
        except httpx.TransportError as error:
            # Includes resets, closed connections and a read stalled longer than downloads.timeout_s.
            raise TransientError(f"{type(error).__name__} on {item.path}") from error
        if written < item.size:
            raise TransientError(f"connection closed early on {item.path}")

    def _verify(self, part: Path, item: PlannedFile, repo_id: str) -> None:
        size = part.stat().st_size
        problem = None
        if size != item.size:
            problem = f"is {size} bytes, expected {item.size}"
        elif item.sha256 and file_sha256(part) != item.sha256:
            problem = "does not match its sha256"
        elif not item.sha256 and git_blob_id(part) != item.etag:
            problem = "does not match its git blob id"
        if problem:
            part.unlink()
            raise UserError(
                f"The downloaded file {item.path} of {repo_id} {problem}; it was removed.", "Run the download again."
            )

    def _clean_partials(self, plan: DownloadPlan) -> None:
        """With every file of the pipeline in place, wanbot's part files left in its blobs belong to files of other
        (older) commits, which nothing will resume: remove them. huggingface_hub's own carry a random suffix and a
        download of its may be writing them: they stay."""
        for part in (plan.repo_folder / "blobs").glob(f"*{PART_SUFFIX}"):
            if SHA256.fullmatch(part.stem) or GIT_OID.fullmatch(part.stem):
                part.unlink(missing_ok=True)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            # The server's wish, up to our own longest wait: a proxy asking for a day would otherwise hang silently.
            return min(retry_after_s, self._config.max_backoff_s)
        delay = min(self._config.backoff_s * 2**attempt, self._config.max_backoff_s)
        return delay * random.uniform(0.5, 1.5)

    # -- HTTP --------------------------------------------------------------------------------------------------

    def _client(self, read_timeout_s: float) -> httpx.AsyncClient:
        timeout = httpx.Timeout(self._config.metadata_timeout_s, read=read_timeout_s)
        return httpx.AsyncClient(base_url=self._endpoint, headers=self._headers, timeout=timeout, follow_redirects=True)

    async def _json(self, client: httpx.AsyncClient, url: str, repo_id: str, what: str) -> Any:
        response = await self._get_with_retries(client, url, repo_id)
        try:
            return json.loads(response.content)
        except ValueError:  # also UnicodeDecodeError
            content_type = response.headers.get("Content-Type", "no content type").split(";")[0]
            raise self._unexpected(repo_id, what, f"something that is not JSON ({content_type})") from None

    async def _get_with_retries(self, client: httpx.AsyncClient, url: str, repo_id: str) -> httpx.Response:
        for attempt in range(self._config.retries + 1):
            try:
                response = await client.get(url)
                self._raise_for_status(response, repo_id)
                return response
            except httpx.TransportError as error:
                failure = TransientError(type(error).__name__)
            except TransientError as error:
                failure = error
            if attempt == self._config.retries:
                raise UserError(
                    f"The Hub did not answer for {repo_id} ({failure}).",
                    "Check the network, or use a local model folder.",
                ) from failure
            await self._sleep(self._backoff(attempt, failure.retry_after_s))
        raise AssertionError("unreachable")

    def _raise_for_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status == 429 or status >= 500:
            retry_after = retry_after_s(response.headers.get("Retry-After", ""), self._wall_clock())
            raise TransientError(f"HTTP {status}", retry_after)
        if status in (401, 403):
            raise UserError(
                f"The Hub refused access to {what} (HTTP {status}): it is gated or private.",
                "Accept its licence on the Hub and set HF_TOKEN to a token that may read it.",
            )
        if status == 404:
            raise UserError(f"{what} was not found on the Hub.", "Check the repo id (for example in models.t2v).")
        raise UserError(f"The Hub answered HTTP {status} for {what}.", "Try again later.")


def check_repo_id(repo_id: str) -> None:
    """Refuse, before any request or folder, a name the Hub could never hold."""
    valid = REPO_ID_PATTERN.fullmatch(repo_id) and not any(part in repo_id for part in ("..", "--"))
    if valid and not repo_id.endswith(".git"):
        return
    raise UserError(
        f"{quoted(repo_id)} is not a Hub repo id: one is owner/name, made of letters, digits, '-', '_' and '.'.",
        "Give an id like Wan-AI/Wan2.2-T2V-A14B-Diffusers, a mode (t2v, i2v, ti2v) or a local model folder.",
    )


async def warn_missing_models(
    settings: Settings, say: Callable[[str], None], downloader: Downloader | None = None
) -> None:
    """At start: one line for each configured Hub model that is not on disk, with what it would download."""
    downloader = downloader or Downloader(settings.models_dir, settings.downloads)
    modes_of: dict[str, list[str]] = {}
    for mode in Mode:
        try:
            model = resolve_model(getattr(settings.models, mode.value), mode)
        except UserError as error:
            say(str(error))
            continue
        if not (model.is_tiny or model.is_local) and downloader.local_snapshot(model.name) is None:
            modes_of.setdefault(model.name, []).append(mode.value)
    for size in await downloader.sizes_to_download(list(modes_of)):
        modes = modes_of[size.repo_id]
        which = f"The {' and '.join(modes)} model {size.repo_id} is not on disk"
        if settings.downloads.offline:
            say(f"{which} and downloads are off (offline mode). Put it on this machine, or jobs for it fail.")
        elif size.missing_bytes is None:
            say(
                f"{which}, and its size could not be checked ({size.not_checked}). Run `wanbot models download "
                f"{modes[0]}` before its first job, or that job waits for the download."
            )
        else:
            say(
                f"{which} ({size_text(size.missing_bytes)} to download). Run `wanbot models download {modes[0]}` "
                "now, or its first job waits for the download."
            )


def retry_after_s(value: str, now: float) -> float | None:
    """The wait a Retry-After header asks for, as seconds or as an HTTP date (RFC 9110 10.2.3); None when it is
    absent or unreadable, so the usual backoff applies."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        # An HTTP date is always GMT; one written with "-0000" parses without a zone.
        seconds = moment.replace(tzinfo=moment.tzinfo or UTC).timestamp() - now
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def tree_files(tree: Any, required: str | None = "model_index.json") -> dict[str, PlannedFile]:
    """The files of a Hub tree listing by path, which must include `required`; ValueError says what is wrong with
    an answer of another shape."""
    if not isinstance(tree, list):
        raise ValueError(f"a JSON {type(tree).__name__} where a list of files belongs")
    files = {}
    for entry in tree:
        if not isinstance(entry, dict):
            raise ValueError(f"a JSON {type(entry).__name__} where a file entry belongs")
        if entry.get("type") != "file":
            continue
        lfs = entry.get("lfs") or {}
        path = entry.get("path")
        size = lfs.get("size", entry.get("size")) if isinstance(lfs, dict) else None
        if not isinstance(path, str) or not isinstance(size, int):
            raise ValueError(f"a file entry without a path and a size ({json.dumps(entry)[:120]})")
        if path.startswith("/") or ".." in path.split("/"):  # it names a file inside the snapshot, nowhere else
            raise ValueError(f"a file entry with a path outside the repo ({json.dumps(entry)[:120]})")
        sha256 = lfs.get("oid")
        etag = sha256 or entry.get("oid")
        # The etag names a file in the cache: only a hash may.
        if not isinstance(etag, str) or not (SHA256.fullmatch(etag) or GIT_OID.fullmatch(etag)):
            raise ValueError(f"a file entry without a hash as its oid ({json.dumps(entry)[:120]})")
        files[path] = PlannedFile(path=path, size=size, sha256=sha256, etag=etag)
    if required is not None and required not in files:
        # Without it the snapshot never counts as complete, and a job waiting for it would wait for ever.
        raise ValueError(f"a list of files without {required}")
    return files


def size_text(count: int) -> str:
    """Bytes in the unit that fits, as disks are sold (powers of 1000): 512 B, 5.0 KB, 410 KB, 1.5 GB, 57 GB."""
    units = ("B", "KB", "MB", "GB", "TB")
    value, unit = float(count), 0
    while abs(value) >= 1000 and unit < len(units) - 1:
        value /= 1000
        unit += 1
    if unit == 0:
        return f"{count} B"
    return f"{value:.1f} {units[unit]}" if abs(value) < 10 else f"{value:.0f} {units[unit]}"


def _write_all(handle: io.FileIO, data: bytes) -> None:
    """An unbuffered write may take only part of the data (a disk about to fill does that): write the rest too, so
    no bytes go missing from the middle of a part file; the disk being full then raises OSError(ENOSPC)."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:  # nothing taken and no error: treat it as the full disk it is
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _complete(path: Path, item: PlannedFile) -> bool:
    """The file is in the snapshot with its size (a link whose blob is missing does not exist)."""
    return path.is_file() and path.stat().st_size == item.size


class _Meter:
    """Bytes done, speed over the last seconds, ETA; calls back at most a few times a second."""

    def __init__(self, total: int, done: int, clock: Callable[[], float], callback: ProgressCallback | None) -> None:
        self._total, self._done, self._clock, self._callback = total, done, clock, callback
        self._window: list[tuple[float, int]] = [(clock(), done)]
        self._last_report = float("-inf")

    @property
    def remaining_bytes(self) -> int:
        return self._total - self._done

    def add(self, count: int, current: str) -> None:
        self._done += count
        now = self._clock()
        if self._callback is None or now - self._last_report < 0.25:
            return
        self._last_report = now
        self._window = [(at, done) for at, done in self._window if now - at <= 10] + [(now, self._done)]
        elapsed = now - self._window[0][0]
        speed = (self._done - self._window[0][1]) / elapsed if elapsed > 0 else 0.0
        eta = (self._total - self._done) / speed if speed > 0 else None
        self._callback(DownloadProgress(self._done, self._total, speed, eta, current))
