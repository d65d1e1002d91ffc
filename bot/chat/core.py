"""The chat core: every flow a chat user can start (a request, cancel, reroll, queue, status, help, pause and resume),
once for every platform, behind one access policy. An adapter turns a platform event into a call here and the
returned text into a platform reply; a third platform needs only an adapter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from bot.chat import texts, transfers
from bot.chat.arrivals import ArrivalOrder
from bot.chat.texts import Buttons
from engine.errors import UserError, counted, quoted
from engine.jobs import Actor, EnqueueResult, Job, JobSource, JobStatus, PlaceKind, WorkerRecord
from engine.service import Engine, Upload, size_text

log = logging.getLogger(__name__)

NOT_ALLOWED = "Sorry, you are not allowed to use this bot here."
NOT_YOURS_TO_EXTEND = "Only the person who asked for this video (or an admin) can extend it."
REROLLING = "Job #{job} is already making this video again with a new seed: /queue shows its place."
EXTENDING = "Job #{job} is already extending this video: /queue shows its place."
NOT_YOURS_TO_REROLL = (
    "Only the person who asked for this video (or an admin) can reroll it. Ask for your own with /video."
)


@dataclass(frozen=True)
class Person:
    """Who acts in a chat: their id on the platform, the name jobs show, and (Discord) their roles' ids."""

    user_id: str
    name: str = ""
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Place:
    """Where: a chat (Telegram) or channel (Discord), and the server it belongs to, if any."""

    chat_id: str
    guild_id: str | None = None
    kind: PlaceKind = "public"  # what the content rules' policy calls it: public, age_restricted or private


@dataclass(frozen=True)
class AccessPolicy:
    """Who may use the bot where. Each allowlist left empty allows everyone; admins pass every list."""

    platform: str
    admins: frozenset[str] = frozenset()  # "platform:user_id", as access.admins has them
    users: frozenset[str] = frozenset()
    chats: frozenset[str] = frozenset()
    guilds: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()

    def is_admin(self, person: Person) -> bool:
        return f"{self.platform}:{person.user_id}" in self.admins

    def allows(self, person: Person, place: Place) -> bool:
        if self.is_admin(person):
            return True
        return all(
            (
                not self.users or person.user_id in self.users,
                not self.chats or place.chat_id in self.chats,
                not self.guilds or place.guild_id in self.guilds,
                not self.roles or bool(person.roles & self.roles),
            )
        )


def ids(values: Sequence[int | str]) -> frozenset[str]:
    return frozenset(str(value) for value in values)


# The keys of a job's `reply` (JobSource.reply) that name its own messages: its progress message, the interaction
# that answers it, what was learnt sending its video. Adapters store them under these names; a job made again from
# another (a retry) gets messages of its own and keeps only where to answer.
OWN_MESSAGE_KEYS = frozenset(
    {
        "status_message_id",  # Telegram: the live message
        "status_kind",  # and whether it is a photo (a preview) with the text as its caption
        "upload_limit",  # what the last 413 allowed
        "video_file_id",  # Telegram: its copy of the sent video, which /history and inline mode send again
        "application_id",  # Discord: the interaction, while its token lives
        "interaction_token",
        "token_expires_at",
        "followups",  # Discord: the interaction's follow-up messages sent so far
        "channel_message_id",  # Discord: the live message after the interaction's token expired
        "progress_deleted",
    }
)


def reply_for_new_job(reply: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in reply.items() if key not in OWN_MESSAGE_KEYS}


class Picture(Protocol):
    """A picture attached to a request, before it is downloaded: what the platform declared, and one try at its
    bytes, at most `limit_bytes` (a retry calls `read` again); `label` names it in errors ("the start picture")."""

    declared_size: int | None
    filename: str | None

    async def read(self, limit_bytes: int, label: str) -> bytes: ...


@dataclass(frozen=True)
class Answer:
    """What the user is told: a text, with the Cancel button of `job_id` when `buttons` says so."""

    text: str
    buttons: Buttons = "none"
    job_id: int | None = None


@dataclass
class Ask:
    """A request as a chat message carried it. `message_id` makes it one job however often it is handled;
    `reply` is where the job's messages go (adapter-specific ids)."""

    person: Person
    place: Place
    message_id: str
    reply: dict[str, str]
    read: Callable[[], texts.ParsedMessage]  # the request and notes on it; raises UserError on unreadable options
    pictures: list[Picture] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ChatCore:
    def __init__(
        self,
        engine: Engine,
        access: AccessPolicy,
        download_limit_bytes: int,
        worth_retrying: Callable[[Exception], bool],
        how_to_ask: str,
    ) -> None:
        """`worth_retrying` says which of the platform library's download errors may pass on another try;
        `how_to_ask` is the platform's own lines of /help."""
        self.engine = engine
        self.access = access
        self.platform = access.platform
        self._download_limit = download_limit_bytes
        self._worth_retrying = worth_retrying
        self._how_to_ask = how_to_ask
        self.arrivals = ArrivalOrder()  # the adapter registers the messages it hands on, in the order they came
        self._reroll_turns: dict[int, tuple[asyncio.Lock, int]] = {}  # job id -> its lock and the presses at it

    def allows(self, person: Person, place: Place) -> bool:
        return self.access.allows(person, place)

    def actor(self, person: Person) -> Actor:
        return Actor(platform=self.platform, user_id=person.user_id, is_admin=self.access.is_admin(person))

    def source(self, ask: Ask) -> JobSource:
        return JobSource(
            platform=self.platform,
            chat_id=ask.place.chat_id,
            user_id=ask.person.user_id,
            user_name=ask.person.name,
            place=ask.place.kind,
            message_id=ask.message_id,
            reply=ask.reply,
        )

    # -- a request -------------------------------------------------------------------------------------------

    async def already_queued(self, person: Person, place: Place, message_id: str) -> bool:
        """True when this message made its job already (handled again after a restart): its messages live on."""
        source = JobSource(platform=self.platform, chat_id=place.chat_id, user_id=person.user_id, message_id=message_id)
        return await self.engine.job_from(source) is not None

    async def request(self, ask: Ask) -> Answer | None:
        """Check, download, validate and queue a request. None: queued, and the relay shows its place (in event
        order, so a job that starts at once is not drawn over); otherwise the answer to show instead."""
        if not self.allows(ask.person, ask.place):
            return Answer(NOT_ALLOWED)
        source = self.source(ask)
        try:
            parsed = ask.read()
            if ask.pictures:
                await self.engine.check_room(source)  # the limits before any download or decode
            roles = ("start", "end")
            uploads = [await self._download(picture, role) for picture, role in zip(ask.pictures, roles, strict=False)]
            # Downloads and checks overlap; the queue takes a chat's requests in the order they were sent.
            await self.arrivals.turn(ask.place.chat_id, ask.message_id)
            submission = await self.engine.submit(
                parsed.request,
                source,
                uploads[0] if uploads else None,
                uploads[1] if len(uploads) > 1 else None,
                notes=[*ask.notes, *parsed.notes],
            )
        except UserError as error:
            return Answer(texts.user_error_text(error))
        except Exception:
            log.exception("request failed platform=%s chat=%s user=%s", self.platform, source.chat_id, source.user_id)
            return Answer(texts.apology())
        return await self._duplicate_answer(submission.result)

    async def _download(self, picture: Picture, role: str) -> Upload:
        limit = self._download_limit
        if picture.declared_size is not None and picture.declared_size > limit:
            raise UserError(
                f"The {role} picture is {size_text(picture.declared_size)}; "
                f"the most I can fetch is {size_text(limit)}.",
                "Send a smaller or more compressed picture.",
            )
        label = f"the {role} picture"
        data = await transfers.download(
            lambda: picture.read(limit, label), self._worth_retrying, picture.declared_size or limit, label
        )
        return Upload(data, picture.filename)

    async def _duplicate_answer(self, result: EnqueueResult) -> Answer | None:
        """A new job's place is shown by the relay; a request that was queued already is answered here."""
        if result.created:
            return None
        paused = await self.engine.is_paused()
        text = texts.queued_text(result.job, result.position, duplicate=True, paused=paused)
        return Answer(text, "cancel", result.job.id)

    # -- acting on a job ---------------------------------------------------------------------------------------

    async def cancel(self, person: Person, place: Place, job_ref: str | None = None) -> str:
        """/cancel [id]: the given job, or the user's newest waiting or running one."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        try:
            job_id = _job_number(job_ref) if job_ref else await self._latest_active_job(person)
            return texts.cancel_text(await self.engine.cancel(job_id, self.actor(person)))
        except UserError as error:
            return texts.user_error_text(error)

    async def _latest_active_job(self, person: Person) -> int:
        active = await self.engine.jobs(texts.ACTIVE, user_key=self.actor(person).user_key, limit=1)
        if not active:
            raise UserError("You have no job to cancel.", "See /queue for your jobs.")
        return active[0].id

    @contextlib.asynccontextmanager
    async def reroll_turn(self, job_id: int) -> AsyncIterator[None]:
        """One press of a job's Reroll at a time, from the refusal check to the new job queued: the next press finds
        that job (reroll_refusal says so to the presser alone), so a burst of taps makes one job and one message."""
        turn, presses = self._reroll_turns.get(job_id, (asyncio.Lock(), 0))
        self._reroll_turns[job_id] = (turn, presses + 1)
        try:
            async with turn:
                yield
        finally:
            turn, presses = self._reroll_turns[job_id]
            if presses == 1:
                del self._reroll_turns[job_id]
            else:
                self._reroll_turns[job_id] = (turn, presses - 1)

    async def reroll_refusal(self, person: Person, place: Place, job_id: int) -> str | None:
        """Why `person` may not reroll the job, or None. Asked before anything is posted, so that a refusal is
        answered to the presser alone. Only the owner (and admins) reroll: the new job is the owner's, on every
        platform, and counts against the owner's limits."""
        engine = self.engine
        return await self._again_refusal(
            person, place, job_id, NOT_YOURS_TO_REROLL, engine.active_reroll, REROLLING, engine.check_reroll
        )

    async def _again_refusal(
        self,
        person: Person,
        place: Place,
        job_id: int,
        not_yours: str,
        active: Callable[[Job], Awaitable[Job | None]],
        already: str,
        check: Callable[[Job], Awaitable[None]],
    ) -> str | None:
        """Why `person` may not make a new job from this one (a reroll, an extend), or None: its owner or an admin,
        none such waiting or running (`already` names it), and `check` passing."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        try:
            job = await self.engine.job(job_id)
        except UserError as error:
            return texts.user_error_text(error)
        if job.source.user_id != person.user_id and not self.access.is_admin(person):
            return not_yours
        waiting = await active(job)
        if waiting is not None:
            return already.format(job=waiting.id)
        try:
            await check(job)
        except UserError as error:
            return texts.user_error_text(error)
        return None

    async def reroll(self, person: Person, job_id: int, message_id: str, reply: dict[str, str]) -> Answer | None:
        """The job again with a new seed, as a new job of its owner answered through `reply`. None: queued, the relay
        shows its place. Call reroll_refusal first."""
        return await self._again(person, job_id, message_id, reply, self.engine.reroll)

    async def _again(
        self,
        person: Person,
        job_id: int,
        message_id: str,
        reply: dict[str, str],
        make: Callable[[int, Actor, JobSource], Awaitable[EnqueueResult]],
    ) -> Answer | None:
        try:
            old = await self.engine.job(job_id)
            source = old.source.model_copy(update={"message_id": message_id, "reply": reply})
            result = await make(job_id, self.actor(person), source)
        except UserError as error:
            return Answer(texts.user_error_text(error))
        return await self._duplicate_answer(result)

    async def extend_refusal(self, person: Person, place: Place, job_id: int) -> str | None:
        """Why `person` may not extend the job's video, or None; asked before anything is posted, as for Reroll. The
        extended video is sent where the first was: the request must come from that chat."""

        async def check(job: Job) -> None:
            if (job.source.platform, job.source.chat_id) != (self.platform, place.chat_id):
                raise UserError(
                    f"Job #{job.id}'s video was made in another chat: extend it there, where it will be sent."
                )
            await self.engine.check_extend(job)

        engine = self.engine
        return await self._again_refusal(
            person, place, job_id, NOT_YOURS_TO_EXTEND, engine.active_extend, EXTENDING, check
        )

    async def extend(
        self, person: Person, job_id: int, message_id: str, reply: dict[str, str], prompt: str | None = None
    ) -> Answer | None:
        """The job's video continued from its last frame (with `prompt`, or the job's own), as a new job of its owner
        answered through `reply`. None: queued, the relay shows its place. Call extend_refusal first."""
        return await self._again(person, job_id, message_id, reply, partial(self.engine.extend, prompt=prompt or None))

    # -- what users ask about ----------------------------------------------------------------------------------

    async def queue_text(self, person: Person, place: Place) -> str:
        """/queue: the user's waiting and running jobs, oldest first, with their places."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        jobs = await self.engine.jobs(texts.ACTIVE, user_key=self.actor(person).user_key)
        if not jobs:
            return "You have no videos waiting or running."
        lines = []
        for job in reversed(jobs):
            position = await self.engine.position(job.id)
            if job.status is JobStatus.RUNNING:
                where = "running"
            else:
                where = f"position {position.position}" if position else ""
            lines.append(f"#{job.id} {job.mode.value} · {where} · {job.params.prompt[:40]}")
        return "\n".join(lines)

    def prompt_refusal(self, prompt: str) -> str | None:
        """Why a prompt is refused by the content rules' blocked terms, or None: asked before a platform answers where
        others see it, so the refusal goes to the requester alone."""
        try:
            self.engine.check_prompt(prompt)
        except UserError as error:
            return texts.user_error_text(error)
        return None

    async def history(self, person: Person, place: Place) -> tuple[str, list[int]]:
        """/history: the user's last videos on this platform, newest first, and the jobs whose video can be sent
        again (no new generation)."""
        if not self.allows(person, place):
            return NOT_ALLOWED, []
        user_key = self.actor(person).user_key
        jobs = await self.engine.jobs([JobStatus.SUCCEEDED], user_key=user_key, limit=texts.HISTORY_SIZE)
        if not jobs:
            return "You have no videos yet. Ask for one with /video.", []
        lines = [texts.HISTORY_HEAD, *(texts.history_line(job) for job in jobs)]
        return "\n".join(lines), [job.id for job in jobs]

    async def shareable(self, person: Person, words: str, copy_key: str) -> list[Job]:
        """Inline mode: the user's own videos the platform holds a copy of (`copy_key` in their reply), newest first,
        whose prompt has every one of `words`; none for someone the access policy keeps out (inline queries come
        from no chat, so a bot limited to some chats shares with no one but its admins)."""
        if not self.allows(person, Place(chat_id="inline")):
            return []
        wanted = words.lower().split()
        jobs = await self.engine.jobs([JobStatus.SUCCEEDED], user_key=self.actor(person).user_key, limit=200)
        return [
            job
            for job in jobs
            if copy_key in job.source.reply and all(word in job.params.prompt.lower() for word in wanted)
        ][: texts.SHARED_SIZE]

    async def send_again(self, person: Person, place: Place, job_id: int) -> tuple[Job | None, str]:
        """The job whose video `person` asked to have sent here again and "", or None and why not: only the owner (or
        an admin) may, while the video is kept, where the content rules let it be shown."""
        if not self.allows(person, place):
            return None, NOT_ALLOWED
        actor = self.actor(person)
        try:
            job = await self.engine.job(job_id)
        except UserError as error:
            return None, error.message
        if job.source.user_key != actor.user_key and not actor.is_admin:
            return None, f"Video #{job_id} is not yours: /history lists your own."
        if job.status is not JobStatus.SUCCEEDED or await self.engine.video_file(job) is None:
            return None, f"Video #{job_id} is no longer kept, so it cannot be sent again. Reroll makes a new one."
        if self.engine.video_policy(job, place.kind) == "block":
            return None, f"Video #{job_id} is not sent here: the content check flagged it. Ask in a direct message."
        return job, ""

    async def status_text(self, person: Person, place: Place) -> str:
        """/status: the workers online and what each is doing (the job it makes, with its progress), and the queue's
        size. Every worker process counts, on whichever machine, `wanbot run`'s own worker too."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        now, lease_s = self.engine.lease_now(), self.engine.settings.queue.lease_s
        online = [worker for worker in await self.engine.workers() if worker.online(now, lease_s)]
        jobs = {worker.id: await self._job_of(worker) for worker in online}
        counts = await self.engine.counts()
        lines = [texts.fleet_head(online, jobs)]
        if await self.engine.is_paused():
            lines.append(texts.QUEUE_PAUSED)
        lines.append(f"Queued: {counts.get('queued', 0)}, running: {counts.get('running', 0)}.")
        names = texts.worker_names(online)
        for worker in online:
            lines.append(texts.worker_line(names[worker.id], worker, jobs[worker.id]))
        actor = self.actor(person)
        used = None if actor.is_admin else await self.engine.gpu_time(actor.user_key)
        if used is not None:
            limit_s = self.engine.settings.queue.daily_gpu_seconds
            lines.append(texts.gpu_time_line(used.used_s, used.expected_s, limit_s))
        return "\n".join(lines)

    async def _job_of(self, worker: WorkerRecord) -> Job | None:
        """The job a worker said it runs, unless it is gone (a job deleted since the worker's last heartbeat)."""
        if worker.current_job is None:
            return None
        try:
            return await self.engine.job(worker.current_job)
        except UserError:
            return None

    def help_text(self, person: Person, place: Place) -> str:
        if not self.allows(person, place):
            return NOT_ALLOWED
        settings = self.engine.settings
        return texts.help_text(self._how_to_ask, bool(settings.loras), self.engine.enhancer_line is not None)

    async def use_own_words(self, person: Person, place: Place, job_id: int) -> str:
        """ "Use my words" under a waiting job whose prompt the enhancer rewrote (its owner, or an admin)."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        try:
            job = await self.engine.use_own_words(job_id, self.actor(person))
        except UserError as error:
            return texts.user_error_text(error)
        return f"Job #{job.id} will be made from your own words: {texts.cut_text(job.params.prompt, 200)}"

    async def enhance(self, person: Person, place: Place, wanted: str | None) -> str:
        """/enhance on|off: whether this chat's requests are rewritten by the prompt enhancer (admins change it)."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        if self.engine.enhancer_line is None:
            return "This bot has no prompt enhancer: your prompts are used as you write them."
        if wanted is None:
            on = await self.engine.enhance_on(self.platform, place.chat_id)
            return (
                f"The prompt enhancer is {'on' if on else 'off'} here (enhance=yes or enhance=no in a request). "
                "Admins: /enhance on or /enhance off."
            )
        if wanted.lower() not in ("on", "off"):
            refusal = UserError(f"{quoted(wanted)} is neither on nor off.", "Use /enhance on or /enhance off.")
            return texts.user_error_text(refusal)
        if not self.access.is_admin(person):
            return texts.user_error_text(
                UserError(
                    "Only admins can turn the prompt enhancer on or off.", "Ask an admin; /enhance says how it is."
                )
            )
        on = wanted.lower() == "on"
        await self.engine.set_enhance(self.platform, place.chat_id, on)
        if on:
            return (
                "Prompt enhancer on: short prompts here are rewritten in detail (enhance=no in a request keeps yours)."
            )
        return "Prompt enhancer off for this chat (enhance=yes in a request still asks for it)."

    def loras_text(self, person: Person, place: Place) -> str:
        """/loras: the styles and characters a request may name."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        return texts.loras_text(self.engine.settings.loras, self.engine.settings.generation.max_loras)

    async def previews(self, person: Person, place: Place, wanted: str | None) -> str:
        """/previews on|off: whether running jobs in this chat show the video taking shape (admins change it)."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        if wanted is None:
            on = await self.engine.previews_on(self.platform, place.chat_id)
            return f"Previews are {'on' if on else 'off'} here. Admins: /previews on or /previews off."
        if wanted.lower() not in ("on", "off"):
            refusal = UserError(f"{quoted(wanted)} is neither on nor off.", "Use /previews on or /previews off.")
            return texts.user_error_text(refusal)
        if not self.access.is_admin(person):
            return texts.user_error_text(
                UserError("Only admins can turn previews on or off.", "Ask an admin; /previews says how it is now.")
            )
        on = wanted.lower() == "on"
        await self.engine.set_previews(self.platform, place.chat_id, on)
        if on and not self.engine.settings.previews.enabled:
            return "Previews are on for this chat, but the bot makes none: previews.enabled is off in its settings."
        return "Previews on: running jobs show the video taking shape." if on else "Previews off for this chat."

    async def pause(self, person: Person, place: Place, paused: bool) -> str:
        """An admin's /pause or /resume: the running job always finishes; only new starts wait."""
        if not self.allows(person, place):
            return NOT_ALLOWED
        if not self.access.is_admin(person):
            return texts.user_error_text(
                UserError("Only admins can pause or resume the queue.", "Ask an admin; /status shows the workers.")
            )
        await self.engine.set_paused(paused)
        if paused:
            return "Paused: the running job finishes, nothing new starts until /resume. Requests are still queued."
        waiting = (await self.engine.counts()).get("queued", 0)
        return f"Resumed: {counted(waiting, 'waiting video')} will start in turn."


def _job_number(text: str) -> int:
    number = text.strip().lstrip("#")
    if not number.isdigit():
        raise UserError(f"{quoted(text)} is not a job number.", "Use /cancel 12, or /cancel for your latest job.")
    return int(number)
