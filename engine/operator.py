"""The operator's side of the facade: what the CLI's commands use with no engine running. The job store (list,
show, cancel, retry, redeliver, pause, stats, workers, backup), the checks of pictures a request would meet, and
models: names, downloads, verification and the tiny offline ones.

Like engine/service.py, importing it costs no torch; bot/ reaches the engine through these two modules alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.enhance.enhancer import Enhanced, Enhancer
from engine.hub.downloads import Downloader, check_repo_id
from engine.hub.hfcache import verify_snapshot
from engine.jobs import Actor, EnqueueResult, Job, JobSource, JobStatus, QueuePosition, WorkerRecord
from engine.pipeline.models import (
    TINY,
    TINY_STYLE_FOLDER,
    GenerationRequest,
    ModelRef,
    model_for_mode,
    resolve_loras,
    resolve_model,
    resolve_request,
)
from engine.queue.jobqueue import JobQueue
from engine.safety.terms import BlockedTerms
from engine.shaping import Upload, loop_end, loop_model
from engine.storage.images import ImageInfo, Mode, check_mode, validate_image_bytes

# Passed on as they are: two checks of model repos the CLI names.
__all__ = [
    "JobStore",
    "PictureCheck",
    "PlanReport",
    "WeightsToFetch",
    "check_pictures",
    "check_repo_id",
    "make_tiny_model",
    "model_downloader",
    "model_named",
    "open_job_store",
    "plan_report",
    "quiet_libraries",
    "verify_snapshot",
    "weights_to_fetch",
]


class JobStore:
    """The job queue alone (no model, no worker, no torch), for the operator's commands that list and manage jobs."""

    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue

    @property
    def path(self) -> Path | None:
        """The database file (SQLite); None for a database on a server."""
        return self._queue.path

    async def job(self, job_id: int) -> Job:
        return await self._queue.get(job_id)

    async def jobs(self, statuses: Collection[JobStatus] = (), limit: int = 50) -> list[Job]:
        """The latest jobs, newest first."""
        return await self._queue.list_jobs(statuses, limit=limit)

    async def history(self, job_id: int) -> list[tuple[str, str | None]]:
        """The job's state changes, oldest first: (kind, detail)."""
        return await self._queue.events_of(job_id)

    async def position(self, job_id: int) -> QueuePosition | None:
        return await self._queue.position(job_id)

    async def cancel(self, job_id: int, actor: Actor) -> Job:
        return await self._queue.cancel(job_id, actor)

    async def retry(self, job_id: int, actor: Actor, source: JobSource | None = None) -> EnqueueResult:
        """The finished job made again as a new job (`source`: where its messages go)."""
        return await self._queue.retry(job_id, actor, source=source)

    async def redeliver(self, job_id: int) -> Job:
        return await self._queue.redeliver(job_id)

    async def stats(self, period_s: float) -> list[dict[str, Any]]:
        return await self._queue.stats(period_s)

    async def set_paused(self, paused: bool) -> None:
        await self._queue.set_paused(paused)

    async def workers(self) -> list[WorkerRecord]:
        return await self._queue.workers()

    async def backup(self, target: Path) -> None:
        await self._queue.backup(target)


@asynccontextmanager
async def open_job_store(settings: Settings) -> AsyncIterator[JobStore]:
    """The job store of `settings`' database, closed at the end of the block."""
    queue = await JobQueue.connect(settings.database_url)
    queue.lease_s = settings.queue.lease_s
    try:
        yield JobStore(queue)
    finally:
        await queue.close()


@dataclass
class PictureCheck:
    """What the bot would say about pictures for a mode: what it warns of and changes, and what it read; and the
    LoRAs a request named, as a job would use them ('name:weight')."""

    warnings: list[str]
    adjustments: list[str]
    images: list[ImageInfo]
    loras: list[str]


def check_pictures(
    settings: Settings,
    mode: Mode,
    start: Upload | None,
    end: Upload | None,
    loras: Collection[str] = (),
    loop: bool = False,
    prompt: str = "",
) -> PictureCheck:
    """Validate pictures as a request's are, and resolve them against the mode's model (an end image it ignores, a
    crop), the LoRAs named against [loras], a loop's rules and the prompt against the blocked terms; raise a
    UserError where the bot would refuse them. (The picture classifier is not run: it needs its model loaded.)"""
    BlockedTerms(settings.safety).check_prompt(prompt)
    model = model_for_mode(mode, settings)
    if loop:
        end = loop_end(GenerationRequest(mode=mode, loop=True), start, end)
        if mode is Mode.T2V:
            loop_model(settings)
    uses = resolve_loras(list(loras), settings.loras, mode, model.spec, settings.generation.max_loras)
    images = [
        validate_image_bytes(upload.data, settings.images, role, upload.filename) if upload else None
        for upload, role in ((start, "start"), (end, "end"))
    ]
    checked = check_mode(mode, images[0], images[1], settings.images)
    infos = [image.info for image in checked.images]
    warnings, adjustments = list(checked.warnings), []
    if infos:
        end_info = infos[1] if len(infos) > 1 else None
        params = resolve_request(GenerationRequest(mode=mode), model, settings.generation, infos[0], end_info)
        warnings.extend(params.warnings)
        adjustments = params.adjustments
    return PictureCheck(warnings, adjustments, infos, [use.label for use in uses])


async def enhanced_prompt(settings: Settings, prompt: str, mode: Mode, has_image: bool) -> Enhanced | None:
    """What prompts.enhancer makes of `prompt`, as a request's would be (its rewrite, or the user's words with the
    note a user reads); None when no enhancer is configured."""
    if settings.prompts.enhancer == "off":
        return None
    enhancer = Enhancer(settings.prompts, model_downloader(settings))
    try:
        return await enhancer.enhance(prompt, mode.value, has_image)
    finally:
        await enhancer.close()


def lora_on_disk(settings: Settings, name: str) -> Path | None:
    """The folder holding every file of the LoRA `name` of [loras], or None while any is missing (a tiny one is
    built at its first job)."""
    lora = settings.loras[name]
    if lora.repo == TINY:
        folder = settings.models_dir / TINY_STYLE_FOLDER
    elif Path(lora.repo).expanduser().is_dir():
        folder = Path(lora.repo).expanduser()
    else:
        return model_downloader(settings).local_files(lora.repo, lora.files)
    return folder if all((folder / file).is_file() for file in lora.files) else None


def model_named(name: str, mode: Mode) -> ModelRef:
    """The model `name` means for `mode` ('tiny', a model folder or a Hub repo id); a UserError if none."""
    return resolve_model(name, mode)


@dataclass(frozen=True)
class WeightsToFetch:
    """One download of `wanbot models download`: a repo (the files its pipeline needs, or just `files`), and why."""

    repo_id: str
    files: tuple[str, ...] | None
    what: str


def weights_to_fetch(settings: Settings, name: str, quality_only: bool = False) -> list[WeightsToFetch]:
    """What `wanbot models download NAME` fetches. A repo id: that repo. A mode (or `all`): the model configured for
    it and, unless `quality_only`, the fast preset's distilled weights, the default preset's: A14B's LoRA pair
    (models.fast_loras), TI2V-5B's distilled model (models.fast_ti2v). Tiny and local models need nothing."""
    modes = list(Mode) if name == "all" else [Mode(name)] if name in {mode.value for mode in Mode} else None
    if modes is None:
        check_repo_id(name)
        return [WeightsToFetch(name, None, name)]
    wanted: list[WeightsToFetch] = []
    for mode in modes:
        model = resolve_model(getattr(settings.models, mode.value), mode)
        if model.is_tiny or model.is_local:
            continue
        wanted.append(WeightsToFetch(model.name, None, f"the {mode.value} model"))
        fast = model.spec.fast
        if quality_only or fast is None:
            continue
        if fast.weights == "lora":
            pair = getattr(settings.models.fast_loras, mode.value)
            wanted.append(
                WeightsToFetch(pair.repo, (pair.high, pair.low), f"the fast preset's LoRA pair for {mode.value}")
            )
            continue
        distilled = resolve_model(settings.models.fast_ti2v, mode)
        if not distilled.is_local:
            wanted.append(WeightsToFetch(distilled.name, None, f"the fast preset's distilled model for {mode.value}"))
    return list(dict.fromkeys(wanted))  # `all`: the i2v and t2v pairs may share a repo, never a file list


def model_downloader(settings: Settings) -> Downloader:
    """wanbot's downloader of model repos, as the worker uses it: plan, download, sizes, verify."""
    return Downloader(settings.models_dir, settings.downloads)


def quiet_libraries() -> None:
    """No progress bars or INFO lines of the model libraries (a command that loads models calls it first)."""
    from engine.pipeline.libraries import quiet_libraries as quiet

    quiet()


def make_tiny_model(target: Path, kind: Mode, seed: int) -> None:
    """Build a randomly initialised tiny Wan pipeline of `kind` and save it as a diffusers folder at `target`."""
    from engine.pipeline.tiny import make_tiny_model as build

    build(target, kind, seed)


@dataclass(frozen=True)
class PlanReport:
    """What `wanbot plan` shows: the plan a job would get on a machine, or why none fits, and every placement."""

    model: str
    job: str  # "832x480, 81 frames, fast (4 transformer passes)"
    machine: str  # what the plan was made for
    chosen: list[str]  # the chosen plan's lines; empty when none fits
    refusal: str  # why no plan fits, and what would; "" when one does
    placements: list[dict[str, Any]]  # every placement, fastest first

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_report(
    settings: Settings,
    mode: Mode,
    preset: str | None,
    size: str | None,
    frames: int | None,
    vram_gib: float | None,
    ram_gib: float | None,
    fp8: bool = False,
) -> PlanReport:
    """The plan for a job of `mode` on this machine, or on a GPU of `vram_gib` (with fp8 where `fp8`) and a host of
    `ram_gib` (either may be given alone; the other is this machine's)."""
    from engine.pipeline.footprint import GIB
    from engine.pipeline.generate import default_locator, pick_device
    from engine.pipeline.machine import host_available, job_size, model_footprint, plan_job, this_machine
    from engine.pipeline.planner import Machine, NoPlanFits, candidates
    from engine.pipeline.speedups import choose_speedups

    model = model_for_mode(mode, settings)
    request = GenerationRequest(mode=mode, prompt="plan", preset=preset, resolution=size, frames=frames)
    params = resolve_request(request, model, settings.generation, rng=None)
    folder = default_locator(settings, model_downloader(settings)).on_disk(model)
    device = pick_device(settings.generation.device)
    works = choose_speedups(settings.generation, device).fp8.value == "on" if device.type == "cuda" else False
    here = this_machine(settings.generation, device, works)
    if vram_gib is None and here.vram is None and ram_gib is not None:
        here = Machine(vram=None, ram=int(ram_gib * GIB))
    elif vram_gib is not None or ram_gib is not None:
        fp8 = fp8 or here.fp8
        vram = int(vram_gib * GIB) if vram_gib is not None else here.vram
        ram = int(ram_gib * GIB) if ram_gib else host_available()
        vae_bf16 = settings.generation.vae_precision != "fp32"
        here = Machine(vram=vram, ram=ram, fp8=fp8, card=here.card, vae_bf16=vae_bf16)
    footprint = model_footprint(model, folder)
    job = job_size(model.spec, params)
    machine_text = (
        f"{here.card or 'a GPU'} with {here.vram / GIB:.1f} GiB" if here.vram is not None else "no GPU (the CPU)"
    )
    machine_text += f", {here.ram / GIB:.0f} GiB host memory" + (", fp8 on" if here.fp8 else "")
    try:
        chosen = plan_job(model, params, here, settings.generation, folder).lines(footprint)
        refusal = ""
    except NoPlanFits as exc:
        chosen, refusal = [], str(exc)
    placements = [
        {
            "memory": plan.memory,
            "text_encoder": plan.text_encoder.short,
            "transformers": plan.experts.short,
            "vae_tiled": plan.vae_tiled,
            "peak_vram_gib": round(plan.vram / GIB, 1),
            "host_ram_gib": round(plan.ram / GIB, 1),
            "seconds": round(plan.seconds, 1) if plan.seconds is not None else None,
            "fits": plan.fits,
        }
        for plan in candidates(footprint, job, here)
    ]
    job_text = f"{job.describe()}, {params.preset.value} ({job.passes} transformer passes)"
    return PlanReport(model.name, job_text, machine_text, chosen, refusal, placements)
