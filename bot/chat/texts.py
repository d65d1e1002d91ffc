"""Chat logic both adapters share: reading options from a message, the texts users see, who may do what, and
keeping one live progress message per job up to date without flooding the platform."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from engine.config import StyleLoraConfig
from engine.errors import UserError, counted, duration_text, quoted
from engine.jobs import Job, JobStatus, Progress, QueuePosition, Stage, WorkerRecord, WorkerState
from engine.pipeline.models import GenerationRequest
from engine.pipeline.presets import PRESET_HELP
from engine.storage.images import Mode

# The buttons under a job's message: Cancel while it waits or runs (and "Use my words" beside it while a job whose
# prompt the enhancer rewrote waits), none once it has ended.
Buttons = Literal["cancel", "own_words", "none"]

log = logging.getLogger(__name__)

OPTION_KEYS = {
    "mode": "mode",
    "seed": "seed",
    "steps": "steps",
    "frames": "frames",
    "size": "resolution",
    "res": "resolution",
    "resolution": "resolution",
    "guidance": "guidance",
    "cfg": "guidance",
    "neg": "negative_prompt",
    "negative": "negative_prompt",
    "preset": "preset",
    "lora": "loras",
    "enhance": "enhance",
    "loop": "loop",
}
# A valid example of each number option, for the hint when one is not a number (frames are 4k+1).
NUMBER_EXAMPLES = {"seed": "42", "steps": "30", "frames": "49", "guidance": "4.5"}
INTEGER_OPTIONS = {"seed", "steps", "frames"}
# key=value anywhere in the text; key:value only for known keys, so "note: a fox" stays in the prompt.
OPTION_PATTERN = re.compile(r"""(?<!\S)([A-Za-z_]+)\s*(=|:)\s*("[^"]*"|'[^']*'|\S+)""")
BAR_WIDTH = 12
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
EXTRA_PICTURES_NOTE = "Only the first two pictures are used: the first as start, the second as end."
QUEUE_PAUSED = "The queue is paused: nothing new starts until an admin resumes it."
NO_WORKER_WAIT = "No worker is online: it starts once one is."
MOVED_BACK = "It was position {was}: the queue takes one job per person in turn, and people who joined are due first."


@dataclass
class ParsedMessage:
    request: GenerationRequest
    notes: list[str] = field(default_factory=list)


def parse_message(text: str, command_mode: Mode | None, has_image: bool) -> ParsedMessage:
    """Read prompt and options from a chat message (without its /command). Unknown options are named, not fatal."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    unknown: list[str] = []

    def take(match: re.Match[str]) -> str:
        key, separator, raw = match.group(1).lower(), match.group(2), match.group(3)
        if key not in OPTION_KEYS:
            if separator == ":":
                return match.group(0)
            unknown.append(key)
            return " "
        if OPTION_KEYS[key] == "loras":  # lora=a lora=b:0.5 names both
            values.setdefault("loras", []).append(raw.strip("\"'"))
        else:
            values[OPTION_KEYS[key]] = raw.strip("\"'")
        return " "

    prompt = " ".join(OPTION_PATTERN.sub(take, text).split())
    if unknown:
        named = list(dict.fromkeys(unknown))  # each name once, in the order written
        what = "an unknown option" if len(named) == 1 else "unknown options"
        notes.append(f"Ignored {what}: {', '.join(named)}. Known: {', '.join(sorted(set(OPTION_KEYS)))}.")
    for key in INTEGER_OPTIONS & values.keys():
        values[key] = _number(key, values[key], int)
    if "guidance" in values:
        values["guidance"] = _number("guidance", values["guidance"], float)
    mode = _mode(values.pop("mode", None), command_mode, has_image)
    return ParsedMessage(request=GenerationRequest(mode=mode, prompt=prompt, **values), notes=notes)


def _number(key: str, raw: str, kind: type) -> Any:
    try:
        return kind(raw)
    except ValueError:
        example = f"For example {key}={NUMBER_EXAMPLES[key]}."
        raise UserError(f"{key} must be a number, not {quoted(raw)}.", example) from None


def _mode(asked: str | None, command_mode: Mode | None, has_image: bool) -> Mode:
    if asked is not None:
        try:
            return Mode(asked.lower())
        except ValueError:
            raise UserError(f"{quoted(asked)} is not a mode.", "Use mode=t2v, mode=i2v or mode=ti2v.") from None
    if command_mode is not None:
        return command_mode
    return Mode.I2V if has_image else Mode.T2V


# -- texts -------------------------------------------------------------------------------------------------------


def progress_bar(fraction: float) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * BAR_WIDTH)
    return "█" * filled + "░" * (BAR_WIDTH - filled)


def with_notes(job: Job, text: str) -> str:
    """`text` followed by every change made to the request and every warning about it (stored with the job): the
    first text shown for a job carries them, the edits after it do not repeat them."""
    return "\n".join([text, *(f"• {note}" for note in (*job.params.adjustments, *job.params.warnings))])


def queued_text(
    job: Job,
    position: QueuePosition | None,
    duplicate: bool = False,
    paused: bool = False,
    was: int | None = None,
) -> str:
    """`was`: a better place this job was shown before, which a user who sees theirs grow is told the reason for."""
    head = f"Job #{job.id} ({job.mode.value})"
    if position is None:
        lines = [f"{head}{' came from this message before' if duplicate else ''}: {job.status.value}."]
    else:
        head += " was already queued from this message" if duplicate else " is queued"
        # Paused: no wait to show, nothing starts until an admin resumes the queue.
        wait = (
            f". {QUEUE_PAUSED}"
            if paused
            else f". {NO_WORKER_WAIT}"
            if position.no_worker
            else f", {_wait_text(position.eta_s)}."
        )
        lines = [f"{head}: position {position.position}{wait}"]
    if position is not None and was is not None and was < position.position:
        lines.append(MOVED_BACK.format(was=was))
    lines.append(
        f"{job.params.width}x{job.params.height}, {job.params.frames} frames at {job.params.fps} fps, "
        f"{counted(job.params.steps, 'step')}, seed {job.params.seed}, {job.params.preset.value} preset."
    )
    return "\n".join(lines)


STAGE_WORDS = {
    Stage.QUEUED: "waiting in the queue",
    Stage.DOWNLOADING: "downloading the model",
    Stage.LOADING: "loading the model",
    Stage.DENOISING: "generating",
    Stage.DECODING: "decoding frames",
    Stage.ENCODING: "encoding the video",
    Stage.UPLOADING: "uploading",
}


RESTARTED = "Started again from the beginning: the worker making it stopped while it ran."


def requeued_text(job: Job) -> str:
    """A running job whose worker stopped or went silent: it waits for a worker again, first in line."""
    head = f"Job #{job.id} ({job.mode.value}) is waiting for a worker again: the one making it stopped."
    return f"{head}\nIt starts again from the beginning, first in line."


def progress_text(job: Job, progress: Progress | None, restarted: bool = False) -> str:
    lines = progress_lines(job, progress)
    return "\n".join([*lines[:1], *([RESTARTED] if restarted else []), *lines[1:]])


def progress_lines(job: Job, progress: Progress | None) -> list[str]:
    """The stage, and for counted stages a bar, step/total and the time left."""
    if progress is None:
        return [f"Job #{job.id}: starting…"]
    words = STAGE_WORDS[progress.stage] + (f", {progress.detail}" if progress.detail else "")
    lines = [f"Job #{job.id}, {job.params.preset.value} preset: {words}"]
    if progress.total:
        counted_steps = f"{progress_bar(progress.fraction)} {progress.step}/{progress.total}"
        lines.append(f"{counted_steps} · {_time_left_text(progress)}")
    return lines


def _wait_text(eta_s: float | None) -> str:
    """A waiting job's wait; None when the queue cannot tell (no video of the model yet, the job ahead overrunning)."""
    if eta_s is None:
        return "the wait is not known yet"
    return "about to start" if eta_s < 1 else f"about {duration_text(eta_s)} to wait"


def _time_left_text(progress: Progress) -> str:
    """A running job's time left, never "0s": under a second is said as such, and a time without the decode and
    encode after the steps (no video of the model made yet) says that they follow."""
    if progress.eta_s is None:
        return "time left not known yet"
    left = "less than a second" if progress.eta_s < 1 else f"about {duration_text(progress.eta_s)}"
    return f"{left} left for the steps, then decoding" if progress.eta_steps_only else f"{left} left"


# -- the fleet (/status) ------------------------------------------------------------------------------------------

NO_WORKER_ONLINE = "Workers: none online. Videos wait in the queue until a worker starts."
# How /status counts the online workers, in this order: "2 online (1 working, 1 idle)".
WORKER_DOINGS = ("working", "downloading", "idle", "paused", "starting")


def making(worker: WorkerRecord, job: Job | None) -> Job | None:
    """The job `worker` is making: the one its record names while that job runs (a record written before the job
    ended still names it for a heartbeat or so)."""
    running = job is not None and job.status is JobStatus.RUNNING and job.id == worker.current_job
    return job if running else None


def worker_doing(worker: WorkerRecord, job: Job | None) -> str:
    """What an online worker is busy with, in one word of WORKER_DOINGS: a job counts first, then a download."""
    if making(worker, job) is not None:
        return "working"
    if worker.downloading:
        return "downloading"
    if worker.state in (WorkerState.PAUSED, WorkerState.STARTING):
        return worker.state.value
    return "idle"


def fleet_head(online: list[WorkerRecord], jobs: dict[str, Job | None]) -> str:
    """/status's first line: how many workers are online and what they do, or that none is and videos wait;
    `jobs`: each worker's job by worker id."""
    if not online:
        return NO_WORKER_ONLINE
    doings = [worker_doing(worker, jobs.get(worker.id)) for worker in online]
    parts = ", ".join(f"{doings.count(doing)} {doing}" for doing in WORKER_DOINGS if doing in doings)
    return f"Workers: {len(online)} online ({parts})."


def worker_names(workers: list[WorkerRecord]) -> dict[str, str]:
    """Each worker's name as people tell them apart, host/device ("gpu-a/cuda:0"), with its process id where two
    share both."""
    shared = {
        (worker.host, worker.device)
        for worker in workers
        if sum((other.host, other.device) == (worker.host, worker.device) for other in workers) > 1
    }
    return {
        worker.id: f"{worker.host}/{worker.device}"
        + (f" (pid {worker.pid})" if (worker.host, worker.device) in shared else "")
        for worker in workers
    }


def worker_line(name: str, worker: WorkerRecord, job: Job | None) -> str:
    """One online worker in /status: the job it makes with its progress (`job`, when it is running), else what it
    downloads, else whether it is idle and with which model."""
    model = f"{worker.loaded_model} loaded" if worker.loaded_model else "no model loaded"
    downloads = ", ".join(sorted(worker.downloading))
    job = making(worker, job)
    if job is not None:
        doing = "making " + " · ".join(progress_lines(job, job.progress))
        if downloads:
            doing += f" · also downloading {downloads}"
    elif downloads:
        doing = f"downloading {downloads}"
    elif worker.state is WorkerState.STARTING:
        doing = "starting"
    elif worker.state is WorkerState.PAUSED:
        doing = f"paused, {model}"
    else:
        doing = f"idle, {model}"
    return f"Worker {name}: {doing}" + ("" if doing.endswith("…") else ".")


def finished_text(job: Job) -> str:
    if job.status is JobStatus.SUCCEEDED:
        took = duration_text((job.finished_at or 0) - (job.started_at or 0))
        return f"Job #{job.id} is done ({took}). Sending the video…"
    if job.status is JobStatus.CANCELLED:
        return f"Job #{job.id} was cancelled."
    return f"Job #{job.id} failed: {job.error_user or 'unknown error'}"


def delivered_text(job: Job) -> str:
    return f"Job #{job.id} is done: the video is below."


def result_caption(job: Job, limit: int = 1024) -> str:
    """The prompt, cut to leave room for the settings below it; 1024 is Telegram's caption limit."""
    params = job.params
    took = duration_text((job.finished_at or 0) - (job.started_at or 0))
    frames = job.result.frames if job.result is not None else params.frames  # an Extend's: both videos
    details = (
        f"\njob #{job.id} · seed {params.seed} · {job.model} · {params.preset.value} preset · "
        f"{params.width}x{params.height} · {frames} frames · {counted(params.steps, 'step')} · {took}"
        + "".join(f" · lora {use.label}" for use in params.loras)
        + (" · loop" if params.loop else "")
        + (f" · extends #{params.extends}" if params.extends is not None else "")
    )
    # The user's own words first: a long rewrite is what gets cut.
    prompt = params.prompt if params.original_prompt is None else f"{params.original_prompt}\nEnhanced: {params.prompt}"
    return fit_text(cut_text(prompt, limit - text_size(details)) + details, limit)


def apology(job_id: int | None = None) -> str:
    about = f" (job #{job_id})" if job_id is not None else ""
    return f"Sorry, something went wrong on our side{about}. It has been logged; please try again."


def user_error_text(error: UserError) -> str:
    return f"{error.message}\n{error.hint}".strip()


def help_text(how_to_ask: str, loras: bool = False, enhancer: bool = False) -> str:
    """The help both platforms share around `how_to_ask`: each adapter's own lines on how to ask for a video there;
    `loras`: whether the bot offers any; `enhancer`: whether it has a prompt enhancer."""
    return (
        "Make a short video from text or a picture.\n"
        f"{how_to_ask}\n"
        # Every example here works for every mode and model: presets such as 480p differ per model, sizes do not.
        "Options, anywhere in the prompt: mode=ti2v seed=42 steps=30 frames=49 size=832x480 guidance=4 "
        'neg="blurry, text" (neg= replaces Wan\'s default negative prompt)\n'
        f"preset=fast or preset=quality ({PRESET_HELP})\n"
        + ("lora=NAME or lora=NAME:0.6 (a style or character; /loras lists them)\n" if loras else "")
        + ("enhance=no (your prompt as you wrote it, not rewritten in detail first)\n" if enhancer else "")
        + "loop=yes (a video that returns to its first frame: t2v, or i2v from one picture)\n"
        + "/queue: your jobs · /cancel [id]: cancel · /status: the workers · /history: your last videos\n"
        "admins: /pause, /resume"
    )


def loras_text(offered: Mapping[str, StyleLoraConfig], most: int) -> str:
    """/loras: one line for each LoRA of [loras], with its modes, default weight and trigger words."""
    if not offered or most == 0:
        return "This bot offers no LoRAs."
    lines = [f"Add lora=NAME or lora=NAME:WEIGHT (0 to 2) to a request, at most {counted(most, 'LoRA')}:"]
    for name, lora in offered.items():
        about = f": {lora.description}" if lora.description else ""
        trigger = f" · adds “{lora.trigger}”" if lora.trigger else ""
        lines.append(f"• {name}{about} ({', '.join(lora.modes)}, weight {lora.weight:g}{trigger})")
    return "\n".join(lines)


# -- fitting a text to a platform's limit -------------------------------------------------------------------------

# Lines that are the items of a list, and what "… and 37 more notes" calls them.
LIST_ITEMS = (("• ", "note"), ("#", "job"))
# Thirteen or more single words in a row, comma separated: a list of names (the unknown options a request named).
NAME_LIST = re.compile(r"[^\s,.;:]+(?:, [^\s,.;:]+){12,}")
NAMES_KEPT = 10


def text_size(text: str) -> int:
    """A text's length as a platform counts it at worst: in UTF-16 code units (an emoji is two), which is never fewer
    than characters, so a text fitted by this count fits however the platform counts."""
    return len(text) + sum(1 for character in text if ord(character) > 0xFFFF)


def fit_text(text: str, limit: int) -> str:
    """`text` within `limit` (a platform's message or caption limit), still readable: a text that fits is returned as
    it is; otherwise long lists of names keep their first ten ("… and 490 more"), then lists of lines (notes, jobs)
    keep the items that fit ("… and 37 more notes"), and only a text still too long is cut, with an ellipsis."""
    if text_size(text) <= limit:
        return text
    lines = [NAME_LIST.sub(_fewer_names, line) for line in text.split("\n")]
    # From the last list up, so the places of those above stay where they are.
    for start, end, noun in reversed(_item_runs(lines)):
        lines[start:end] = _fewer_items(lines, start, end, noun, limit)
    return cut_text("\n".join(lines), limit)


def cut_text(text: str, limit: int) -> str:
    """The last resort: the start of `text` and an ellipsis, within `limit`."""
    if text_size(text) <= limit:
        return text
    if limit < 1:
        return ""
    size = 0
    for end, character in enumerate(text):
        size += text_size(character)
        if size > limit - 1:  # one is left for the ellipsis
            return text[:end].rstrip() + "…"
    return text


def _fewer_names(match: re.Match[str]) -> str:
    names = match.group(0).split(", ")
    return f"{', '.join(names[:NAMES_KEPT])} … and {len(names) - NAMES_KEPT} more"


def _item_kind(line: str) -> str | None:
    for marker, noun in LIST_ITEMS:
        if line.startswith(marker) and (marker != "#" or line[1:2].isdigit()):
            return noun
    return None


def _item_runs(lines: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, noun) of each run of two or more list items of one kind, top to bottom."""
    runs: list[tuple[int, int, str]] = []
    start = 0
    while start < len(lines):
        noun = _item_kind(lines[start])
        end = start + 1
        while noun is not None and end < len(lines) and _item_kind(lines[end]) == noun:
            end += 1
        if noun is not None and end - start >= 2:
            runs.append((start, end, noun))
        start = end
    return runs


def _fewer_items(lines: list[str], start: int, end: int, noun: str, limit: int) -> list[str]:
    """The first items of lines[start:end] that fit in `limit` with the rest of `lines`, then one line counting the
    others; at least the first item stays (a text still too long is cut after)."""
    items = lines[start:end]
    others = text_size("\n".join(lines[:start] + lines[end:]))
    size = sum(text_size(item) + 1 for item in items)  # the first `kept` items, each with its line break
    for kept in range(len(items), 0, -1):
        dropped = len(items) - kept
        summary = [f"… and {dropped} more {noun}{'s' if dropped > 1 else ''}"] if dropped else []
        if kept == 1 or others + size + sum(text_size(line) + 1 for line in summary) <= limit:
            return [*items[:kept], *summary]
        size -= text_size(items[kept - 1]) + 1
    return items


# -- live progress messages --------------------------------------------------------------------------------------


class RetryLater(Exception):
    """The platform asked us to wait (a flood limit); the edit is retried after `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"retry after {seconds}s")
        self.seconds = seconds


EditSender = Callable[[Any, str, Any], Awaitable[None]]


@dataclass(frozen=True)
class _Pending:
    text: str
    extra: Any
    refresh: bool
    at_once: bool = False


class LiveMessages:
    """Keeps one message per key (a job) showing the latest text: at most one edit per `interval_s` (or per
    `interval_for(key)`), only the newest text is sent, the same text (with the same extra) never twice, and a
    flood-limit wait delays the
    edit instead of dropping it.

    Two priorities: a text marked `refresh` (a waiting job's new place) goes only while no other text is ready to go,
    one at a time, so that answers and progress never queue behind a hundred places at the platform's rate limit;
    while it waits, a newer text for its key replaces it (a newer place, the job's start, its end). A text marked
    `at_once` (a job's end) does not wait for the pacing: one edit more per job is worth "done" showing with the
    video, not seconds after it."""

    def __init__(
        self,
        send: EditSender,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        interval_for: Callable[[Any], float] | None = None,
    ) -> None:
        self._send = send
        self._interval_for = interval_for or (lambda key: interval_s)
        self._clock = clock
        self._pending: dict[Any, _Pending] = {}
        self._shown: dict[Any, tuple[str, Any]] = {}  # what each message shows: its text and extra
        self._last_sent: dict[Any, float] = {}
        self._tasks: dict[Any, asyncio.Task[None]] = {}
        self._refreshing = 0  # refreshes being sent now
        self._line: deque[Any] = deque()  # keys whose refresh waits for its turn, first come first
        self._changed = asyncio.Event()  # a text was added, taken or sent: waiting refreshes look again
        self._pacing: set[Any] = set()  # keys whose next edit waits out the interval now

    def update(self, key: Any, text: str, extra: Any = None, refresh: bool = False, at_once: bool = False) -> None:
        pending = self._pending.get(key)
        if self._shown.get(key) == (text, extra) and pending is None:
            return
        # A text that replaces an answer not sent yet is that answer now: the user is still waiting for it.
        self._pending[key] = _Pending(text, extra, refresh and (pending is None or pending.refresh), at_once)
        self._changed.set()
        if at_once and key in self._pacing:
            # Only ever while it sleeps, so nothing is being sent; the cancelled task is not done yet: a new one sends.
            self._tasks[key].cancel()
            self._pacing.discard(key)
            self._tasks[key] = asyncio.create_task(self._flush(key))
        elif key not in self._tasks or self._tasks[key].done():
            self._tasks[key] = asyncio.create_task(self._flush(key))

    async def settle(self, key: Any) -> None:
        """Wait until the latest text for `key` has been sent (or given up)."""
        while (task := self._tasks.get(key)) is not None and not task.done():
            await asyncio.wait({task})  # a task replaced by an at_once text ends cancelled: wait for the new one

    def forget(self, key: Any) -> None:
        """Drop what is kept for `key` once its last text is shown, unless a newer text is still waiting."""
        if key in self._pending:
            return
        self._shown.pop(key, None)
        self._last_sent.pop(key, None)
        self._tasks.pop(key, None)

    def __len__(self) -> int:
        """How many messages are tracked: it must not grow with every job a long-running bot has seen."""
        return len(self._shown.keys() | self._pending.keys() | self._tasks.keys())

    async def _flush(self, key: Any) -> None:
        while key in self._pending:
            wait = self._last_sent.get(key, float("-inf")) + self._interval_for(key) - self._clock()
            if wait > 0 and not self._pending[key].at_once:
                self._pacing.add(key)
                try:
                    await asyncio.sleep(wait)
                finally:
                    self._pacing.discard(key)
            await self._turn_of(key)
            pending = self._pending.pop(key)
            self._changed.set()
            if self._shown.get(key) == (pending.text, pending.extra):
                continue
            self._refreshing += pending.refresh
            try:
                await self._send(key, pending.text, pending.extra)
            except RetryLater as limit:
                self._pending.setdefault(key, pending)
                await asyncio.sleep(limit.seconds)
                continue
            except Exception:
                # A network error on one edit must not end this message's updates: the next text still goes out.
                log.warning("could not update the message of %s", key, exc_info=True)
                self._last_sent[key] = self._clock()
                continue
            finally:
                self._refreshing -= pending.refresh
                self._changed.set()
            self._shown[key] = (pending.text, pending.extra)
            self._last_sent[key] = self._clock()

    async def _turn_of(self, key: Any) -> None:
        """Returns at once for an answer or progress. Refreshes wait in line: the first goes when no other refresh is
        being sent and no other text is ready to go; one whose text was replaced by an answer leaves the line at once.
        """
        if not self._pending[key].refresh:
            return
        self._line.append(key)
        try:
            while self._pending[key].refresh and not self._first_refresh_may_go(key):
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._line.remove(key)
            self._changed.set()  # the next in line looks

    def _first_refresh_may_go(self, key: Any) -> bool:
        return self._line[0] == key and not self._refreshing and not self._others_ready()

    def _others_ready(self) -> bool:
        now = self._clock()
        return any(
            not pending.refresh and self._last_sent.get(key, float("-inf")) + self._interval_for(key) <= now
            for key, pending in self._pending.items()
        )

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def cancel_text(job: Job) -> str:
    if job.status is JobStatus.CANCELLED:
        return f"Job #{job.id} is cancelled."
    return f"Job #{job.id} is stopping…"


HISTORY_SIZE = 10  # the videos /history lists
SHARED_SIZE = 20  # the videos an inline query offers
HISTORY_HEAD = "Your last videos (tap a number to have it sent here again):"


def history_line(job: Job) -> str:
    """/history: one video, as its owner remembers it."""
    assert job.result is not None
    made = datetime.fromtimestamp(job.finished_at or job.created_at).strftime("%b %d %H:%M")
    return f"#{job.id} {job.mode.value} · {job.result.duration_s:.1f} s · {made} · {job.params.prompt[:50]}"


def gpu_time_line(used_s: float, waiting_s: float, limit_s: float) -> str:
    """/status: a user's GPU time a day, as the quota counts it."""
    waiting = f", and about {duration_text(waiting_s)} more for your waiting videos" if waiting_s else ""
    return f"You have used {duration_text(used_s)} of your {duration_text(limit_s)} of GPU time a day{waiting}."


def withheld_text(job: Job) -> str:
    return f"Video #{job.id} was made, but it is not sent here: {job.delivery_error}."


def undeliverable_text(job: Job) -> str:
    return (
        f"Job #{job.id} is done, but the video could not be sent ({job.delivery_error}). "
        f"An admin can send it again with: wanbot queue redeliver {job.id}"
    )
