"""`wanbot validate`, `wanbot generate` and `wanbot demo`: a request from the terminal through the same checks, queue
and worker as a chat's, with a progress bar; Ctrl+C or SIGTERM cancels its job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bot.cli.common import (
    CLI_ACTOR,
    ConfigOption,
    JsonOption,
    LoraOption,
    console,
    errors,
    run_or_exit,
    settings_from,
    usage_error,
)
from engine.config import ModelsConfig, Settings, StyleLoraConfig
from engine.errors import UserError, counted
from engine.jobs import EventKind, Job, JobSource, JobStatus
from engine.operator import check_pictures, enhanced_prompt, model_named, quiet_libraries
from engine.pipeline.models import GenerationRequest
from engine.pipeline.presets import PRESET_HELP, Preset
from engine.service import Upload
from engine.storage.images import Mode

if TYPE_CHECKING:
    from engine.service import Engine


def validate(
    mode: Annotated[Mode, typer.Option(help="t2v, i2v or ti2v.", show_default=False)],
    start: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Start image (default: none; i2v and ti2v need one).")
    ] = None,
    end: Annotated[Path | None, typer.Option(metavar="FILE", help="End image (default: none).")] = None,
    lora: LoraOption = None,
    loop: Annotated[bool, typer.Option("--loop", help="Check it as a loop, as loop=yes (default: no loop).")] = False,
    prompt: Annotated[
        str, typer.Option(metavar="TEXT", help="Check the prompt against safety.blocked_terms (default: none).")
    ] = "",
    enhance: Annotated[
        bool, typer.Option("--enhance", help="Show what prompts.enhancer makes of --prompt (default: not run).")
    ] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Check images, LoRAs, a loop and a prompt for a mode, as the bot would, and say what the video will change.
    Exit 0 if valid, 2 if not."""
    settings = settings_from(config)
    report: dict[str, Any] = {
        "valid": False,
        "mode": mode.value,
        "errors": [],
        "warnings": [],
        "adjustments": [],
        "images": [],
        "loras": [],
        "enhanced": None,
    }
    try:
        # What generate and the chats would say, once the pictures meet the model too: an end image it ignores, a crop.
        pictures = _read_picture(start, "start"), _read_picture(end, "end")
        checked = check_pictures(settings, mode, *pictures, lora or (), loop, prompt)
        if enhance:
            report["enhanced"] = asyncio.run(_enhanced(settings, prompt, mode, bool(checked.images)))
        report.update(
            valid=True,
            warnings=checked.warnings,
            adjustments=checked.adjustments,
            images=[info.model_dump() for info in checked.images],
            loras=checked.loras,
        )
    except UserError as exc:
        report["valid"] = False
        report["errors"].append(str(exc))
    if as_json:
        console.print_json(json.dumps(report))
    else:
        _print_validation(report)
    raise typer.Exit(0 if report["valid"] else 2)


async def _enhanced(settings: Settings, prompt: str, mode: Mode, has_image: bool) -> str:
    """What a request's prompt would become; a UserError where the enhancer is off or keeps the user's words."""
    if not prompt:
        raise UserError("--enhance rewrites a prompt: give it with --prompt.")
    enhanced = await enhanced_prompt(settings, prompt, mode, has_image)
    if enhanced is None:
        raise UserError("No prompt enhancer is configured (prompts.enhancer is off).", "Set prompts.enhancer first.")
    if not enhanced.enhanced:
        raise UserError(f"The enhancer kept your words: {enhanced.note}")
    return enhanced.prompt


def _read_picture(path: Path | None, role: str) -> Upload | None:
    if path is None:
        return None
    try:
        return Upload(path.read_bytes(), path.name)
    except OSError as exc:
        raise UserError(f"The {role} image {path} cannot be read ({exc.strerror}).", "Check the path.") from None


def _print_validation(report: dict[str, Any]) -> None:
    if report["valid"]:
        console.print(f"[green]valid[/green] for {report['mode']}")
    for message in report["errors"]:
        console.print(f"[red]invalid:[/red] {message}", highlight=False)
    for message in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
    for message in report["adjustments"]:
        console.print(f"note: {message}", highlight=False, markup=False)
    if report["loras"]:
        console.print(f"LoRAs: {', '.join(report['loras'])}", highlight=False, markup=False)
    if report["enhanced"] is not None:
        console.print(f"prompt enhanced: {report['enhanced']}", highlight=False, markup=False)
    for image in report["images"]:
        console.print(
            f"  {image['role']}: {image['format']} {image['width']}x{image['height']} {image['mode']}, "
            f"{image['file_size']} bytes, sha256 {image['source_sha256'][:12]}…",
            highlight=False,
        )


QUEUE_PAUSED = "the queue is paused (wanbot queue resume)"


async def _wait_for_jobs(
    engine: Engine, job_ids: set[int], show_progress: bool, stop: asyncio.Event | None = None, again: bool = False
) -> list[Job]:
    """Run the worker (or wait on another process's) until every job in `job_ids` has ended.

    The command owns its jobs: once `stop` is set (a signal), or when the queue is paused while one still waits, the
    jobs not yet ended are cancelled, so none is left behind to be made by the next command or `wanbot run`. `again`:
    this command waited for jobs before, which stopped the worker."""
    stop = stop or asyncio.Event()
    from bot.roles.runtime import worker_lock

    with worker_lock(engine.settings) as own_worker:
        inbox = engine.subscribe()
        worker = None
        if own_worker:
            await engine.recover()
            worker = asyncio.create_task(engine.run_worker(again=again))
        else:
            errors.print("Another wanbot process runs the worker; waiting for it to make the video.")
        try:
            with _progress_display(show_progress) as display:
                pending = set(job_ids)
                while pending and not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        event = await asyncio.wait_for(inbox.get(), timeout=1.0)
                        display.show(event)
                    jobs = [await engine.job(job_id) for job_id in pending]
                    pending = {job.id for job in jobs if not job.status.terminal}
                    if any(job.status is JobStatus.QUEUED for job in jobs) and await engine.is_paused():
                        cancelled = await _cancel_jobs(engine, pending)
                        raise UserError(f"Cancelled {cancelled}: {QUEUE_PAUSED}.", "Resume it, then run this again.")
                    if worker is not None and worker.done():
                        worker.result()
                if stop.is_set():
                    await _cancel_jobs(engine, pending)
        finally:
            inbox.close()
            if worker is not None:
                # A cancelled job stops at its next step; only an unexpected end puts the running one back.
                await engine.stop_worker(requeue_running=not stop.is_set())
                await worker
    return [await engine.job(job_id) for job_id in sorted(job_ids)]


async def _cancel_jobs(engine: Engine, job_ids: set[int]) -> str:
    """Cancel what has not ended (a running job stops at its next step); say which, as 'job #3' or 'jobs #3, #4'."""
    for job_id in sorted(job_ids):
        with contextlib.suppress(UserError):  # it ended meanwhile
            await engine.cancel(job_id, CLI_ACTOR)
    named = ", ".join(f"#{job_id}" for job_id in sorted(job_ids))
    return f"job{'s' if len(job_ids) > 1 else ''} {named}"


class _ProgressDisplay:
    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._tasks: dict[int, Any] = {}

    def show(self, event: Any) -> None:
        if self._progress is None or event.kind not in (EventKind.PROGRESS, EventKind.STARTED):
            return
        job_id = event.job.id
        if job_id not in self._tasks:
            self._tasks[job_id] = self._progress.add_task(f"job #{job_id}", total=None, count="")
        if event.progress is None:
            return
        stage = event.progress.stage.value + (f" ({event.progress.detail})" if event.progress.detail else "")
        # Loading and downloading have no step count yet: the bar pulses, with no "0/None" beside it.
        total = event.progress.total or None
        self._progress.update(
            self._tasks[job_id],
            description=f"job #{job_id} {stage}",
            completed=event.progress.step,
            total=total,
            count=f"{event.progress.step}/{total}" if total else "",
        )


@contextlib.contextmanager
def _progress_display(enabled: bool, console: Console = errors) -> Iterator[_ProgressDisplay]:
    if not enabled:
        yield _ProgressDisplay(None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield _ProgressDisplay(progress)


def _upload(path: Path | None) -> Upload | None:
    if path is None:
        return None
    try:
        return Upload(path.read_bytes(), path.name)
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror}).", "Check the path.") from None


def _model_option(ctx: typer.Context, name: str | None) -> str | None:
    """Check --model as soon as it is read: the engine's message about a bad name points to models.<mode>."""
    mode = ctx.params.get("mode")
    if name is None or mode is None:
        return name
    try:
        model_named(name, mode)
    except UserError as exc:
        what = f"--model {exc.message.removeprefix('Model ')}" if exc.message.startswith("Model ") else exc.message
        example = getattr(ModelsConfig(), mode.value)
        raise usage_error(f"{what} Give --model a model folder, 'tiny', or a Hub repo id such as {example}.") from None
    return name


def generate(
    # Eager: --model's check below needs the mode, wherever on the line each one stands.
    mode: Annotated[
        Mode | None,
        typer.Option(help="t2v, i2v or ti2v (default: none; with --extend, generation.extend_mode's).", is_eager=True),
    ] = None,
    prompt: Annotated[
        str, typer.Option(metavar="TEXT", help="What the video shows (default: none; t2v needs one).")
    ] = "",
    start: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Start image (default: none; i2v and ti2v need one).")
    ] = None,
    end: Annotated[Path | None, typer.Option(metavar="FILE", help="End image (default: none).")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="Repo id, folder or 'tiny' (default: the configured models.<mode>).",
            callback=_model_option,
        ),
    ] = None,
    frames: Annotated[
        int | None, typer.Option(metavar="N", help="Frames, 4k+1 (default: the model's, 81 or 121 for TI2V-5B).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(metavar="N", help="Denoising steps (default: the model's, 40 or 50 for TI2V-5B).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(metavar="PX", help="Width, with --height (default: from --resolution).")
    ] = None,
    height: Annotated[
        int | None, typer.Option(metavar="PX", help="Height, with --width (default: from --resolution).")
    ] = None,
    resolution: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE",
            help="WxH such as 832x480, or the model's preset: 480p or 720p (A14B), 720p (TI2V-5B) "
            "(default: the model's; images set shape).",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(metavar="N", help="0 to 4294967295 (default: a random one).")] = None,
    guidance: Annotated[float | None, typer.Option(metavar="SCALE", help="0 to 20 (default: the model's).")] = None,
    preset: Annotated[
        Preset | None,
        typer.Option(help=f"fast or quality (default: generation.default_preset). {PRESET_HELP}"),
    ] = None,
    negative: Annotated[
        str, typer.Option(metavar="TEXT", help="What to avoid (default: generation.negative_prompt).")
    ] = "",
    lora: LoraOption = None,
    enhance: Annotated[
        bool | None,
        typer.Option(
            "--enhance/--no-enhance", help="Rewrite the prompt with prompts.enhancer first (default: when one is on)."
        ),
    ] = None,
    loop: Annotated[
        bool, typer.Option("--loop", help="A video that returns to its first frame: t2v, or i2v from --start alone.")
    ] = False,
    extend: Annotated[
        Path | None,
        typer.Option(
            metavar="VIDEO",
            help="Continue one of the bot's videos from its last frame (with --prompt, or its own), as one video "
            "(default: none).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Copy the MP4 here too (default: only under the data folder).")
    ] = None,
    parallel: Annotated[
        int | None,
        typer.Option(
            metavar="N", min=1, max=8, help="Make it on N ranks, a device each (default: generation.parallel)."
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            metavar="DEVICE", help="cpu, cuda, cuda:N, or the ranks' cuda:0,cuda:1 (default: generation.device)."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make one video through the same validation, queue and worker as the bot, with a progress bar."""
    settings = settings_from(config)
    on = {key: value for key, value in (("parallel", parallel), ("device", device)) if value is not None}
    settings.generation = settings.generation.model_copy(update=on)
    if extend is not None:
        # An Extend's new part takes the video's own settings: an option it would ignore is a mistake, said at once.
        given = {
            "--mode": mode not in (None, Mode(settings.generation.extend_mode)),
            "--start": start, "--end": end, "--model": model, "--frames": frames, "--steps": steps,
            "--width": width, "--height": height, "--resolution": resolution, "--seed": seed,
            "--guidance": guidance, "--preset": preset, "--negative": negative, "--lora": lora,
            "--enhance/--no-enhance": enhance is not None, "--loop": loop,
        }  # fmt: skip
        if ignored := [name for name, value in given.items() if value]:
            raise usage_error(
                f"--extend continues the video with its own settings (and generation.extend_mode's model), so it "
                f"takes no {', '.join(ignored)}. Give --prompt for new words, or leave it out for the video's own."
            )
        mode = Mode(settings.generation.extend_mode)
    if mode is None:
        raise usage_error("Give --mode: t2v, i2v or ti2v (or --extend VIDEO to continue one of the bot's videos).")
    if (width is None) != (height is None):
        errors.print("Give both --width and --height, or neither.")
        raise typer.Exit(2)
    size = f"{width}x{height}" if width and height else resolution
    request = GenerationRequest(
        mode=mode,
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance=guidance,
        resolution=size,
        frames=frames,
        preset=preset,
        loras=lora or [],
        enhance=enhance,
        loop=loop,
    )
    if out is not None and out.is_dir():
        raise usage_error(f"--out {out} is a folder, not a file. Name the file to write, such as {out / 'video.mp4'}.")
    try:
        job = run_or_exit(_generate(settings, request, _upload(start), _upload(end), model, extend))
    except _Interrupted as stopped:
        errors.print(stopped.message, markup=False)
        raise typer.Exit(128 + stopped.signum) from None
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        errors.print(f"job #{job.id} {job.status.value}: {job.error_user or ''}", markup=False)
        raise typer.Exit(1)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(Path(job.result.path).read_bytes())
        except OSError as exc:
            where = job.result.path
            raise usage_error(f"The video could not be copied to {out} ({exc.strerror}). It is in {where}.") from None
    console.print(f"{out or job.result.path}  ({_timings(job)})", highlight=False)


class _Interrupted(Exception):
    """`generate` got SIGINT or SIGTERM and cancelled its job."""

    def __init__(self, signum: int, job: Job) -> None:
        super().__init__(signum, job)
        self.signum = signum
        name = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
        done = "was cancelled" if job.status is JobStatus.CANCELLED else "stops at its next step"
        self.message = f"Interrupted by {name}: job #{job.id} {done} and makes no video. Run the command again for it."


async def _job_of_video(engine: Engine, video: Path) -> Job:
    """The finished job whose video `video` is (a path, or its name under the outputs folder): every video's name is
    its own (job-<id>-<random>.mp4)."""
    for job in await engine.jobs([JobStatus.SUCCEEDED], limit=10_000):
        if job.result is not None and Path(job.result.path).name == video.name:
            return job
    raise UserError(
        f"{video} is not a video this bot made (or it was cleaned up).",
        "--extend continues one of its videos: `wanbot queue list` shows them, `wanbot queue show ID` their paths.",
    )


async def _generate(
    settings: Settings,
    request: GenerationRequest,
    start: Upload | None,
    end: Upload | None,
    model: str | None,
    extend: Path | None = None,
) -> Job:
    # torch and diffusers load only for the commands that generate: `queue list` stays quick.
    from engine.service import Engine, Submission

    quiet_libraries()
    # pause_on_start is for `wanbot run` after a restart; here it would pause the queue under this command's own job.
    settings = settings.model_copy(update={"queue": settings.queue.model_copy(update={"pause_on_start": False})})
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()
        loop.remove_signal_handler(signum)  # a second Ctrl+C stops at once

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    engine = await Engine.open(settings)
    try:
        if await engine.is_paused():
            raise UserError(f"Nothing was queued: {QUEUE_PAUSED}.", "Resume it, then run this command again.")
        source = JobSource(platform="cli", chat_id="terminal", user_id="admin", place="private")
        if extend is not None:
            earlier = await _job_of_video(engine, extend)
            submission = Submission(await engine.extend(earlier.id, CLI_ACTOR, source, request.prompt or None))
        else:
            submission = await engine.submit(request, source, start, end, model_override=model)
        job = submission.result.job
        for note in submission.notes:
            errors.print(f"note: {note}", markup=False)
        errors.print(f"job #{job.id}: {_settings_text(job)}", markup=False)
        job = (await _wait_for_jobs(engine, {job.id}, show_progress=True, stop=stop))[0]
        if received and job.status is not JobStatus.SUCCEEDED:
            raise _Interrupted(received[0], job)
        return job
    finally:
        await engine.close()


def _settings_text(job: Job) -> str:
    params = job.params
    return (
        f"{params.width}x{params.height}, {params.frames} frames at {params.fps} fps, {counted(params.steps, 'step')}, "
        f"seed {params.seed}, model {job.model}, {params.preset.value} preset"
        + "".join(f", lora {use.label}" for use in params.loras)
        + (", loop" if params.loop else "")
        + (f", extends #{params.extends}" if params.extends is not None else "")
    )


def _timings(job: Job) -> str:
    assert job.result is not None
    parts = [f"{key.removesuffix('_s')} {value:.2f}s" for key, value in job.result.timings.items()]
    return ", ".join(parts)


DEMO_LORA = "demo-style"  # a tiny random stand-in, as the tiny models are
DEMO_JOBS = 6


def demo(config: ConfigOption = None) -> None:
    """Run a t2v, an i2v (start + end image) and a ti2v job at quality, a fast t2v one and the same with a style
    LoRA, then an extend of the first, on the tiny models through queue and worker."""
    settings = settings_from(config)
    # Five jobs from one user: the per-user queue limit (3 by default) must let them all wait at once.
    queue = settings.queue.model_copy(update={"per_user_limit": max(settings.queue.per_user_limit, DEMO_JOBS)})
    models = ModelsConfig(t2v="tiny", i2v="tiny", ti2v="tiny")
    loras = {**settings.loras, DEMO_LORA: StyleLoraConfig(repo="tiny", file=f"{DEMO_LORA}.safetensors")}
    settings = settings.model_copy(update={"models": models, "queue": queue, "loras": loras})
    started = time.monotonic()
    jobs = run_or_exit(_demo(settings))
    failed = [job for job in jobs if job.status is not JobStatus.SUCCEEDED]
    for job in jobs:
        if job.result is not None:
            console.print(
                f"{job.mode.value:5} {job.params.preset.value:7} job #{job.id}: {job.result.path}  "
                f"{''.join(f'lora {use.label}, ' for use in job.params.loras)}"
                f"{f'extends #{job.params.extends}, ' if job.params.extends else ''}"
                f"{job.result.width}x{job.result.height}, {job.result.frames} frames @ {job.result.fps} fps, "
                f"{sum(job.result.run.transformer_calls.values()) if job.result.run else '?'} transformer passes  "
                f"({_timings(job)})",
                highlight=False,
            )
        else:
            console.print(f"{job.mode.value:5} job #{job.id}: {job.status.value}: {job.error_user}", highlight=False)
    console.print(f"demo finished in {time.monotonic() - started:.1f}s", highlight=False)
    if failed:
        raise typer.Exit(1)


async def _demo(settings: Settings) -> list[Job]:
    from engine.service import Engine, Upload

    start_png, end_png = _demo_images()
    engine = await Engine.open(settings)
    try:
        source = JobSource(platform="cli", chat_id="demo", user_id="admin", place="private")
        quality = Preset.QUALITY
        fox = "w1 w2 w3 a red fox running through snow"
        requests = [
            (GenerationRequest(mode=Mode.T2V, prompt=fox, preset=quality), None, None),
            (
                GenerationRequest(mode=Mode.I2V, prompt="w4 w5 the sun sets", preset=quality),
                Upload(start_png, "start.png"),
                Upload(end_png, "end.png"),
            ),
            (
                GenerationRequest(mode=Mode.TI2V, prompt="w6 w7 waves roll in", preset=quality),
                Upload(start_png, "start.png"),
                None,
            ),
            # The same fox with the distilled 4-step LoRAs: 4 transformer passes instead of 2 x 4.
            (GenerationRequest(mode=Mode.T2V, prompt=fox, preset=Preset.FAST), None, None),
            # And with a style LoRA beside them, as `lora=demo-style` asks in a chat.
            (GenerationRequest(mode=Mode.T2V, prompt=fox, preset=Preset.FAST, loras=[DEMO_LORA]), None, None),
        ]
        ids = []
        for request, start, end in requests:
            submission = await engine.submit(request, source, start, end, priority=1)
            ids.append(submission.result.job.id)
            console.print(f"queued {request.mode.value} as job #{submission.result.job.id}", highlight=False)
        jobs = await _wait_for_jobs(engine, set(ids), show_progress=sys.stderr.isatty())
        # The fox continued from its last frame, as the Extend button under a video asks: one joined video.
        extended = await engine.extend(ids[0], CLI_ACTOR, prompt="w1 w2 w3 the fox leaps over a fallen tree")
        console.print(f"queued an extend of job #{ids[0]} as job #{extended.job.id}", highlight=False)
        return jobs + await _wait_for_jobs(engine, {extended.job.id}, show_progress=sys.stderr.isatty(), again=True)
    finally:
        await engine.close()


def _demo_images() -> tuple[bytes, bytes]:
    """A sunset-coloured start frame and a darker end frame of the same 4:3 shape, drawn on the spot."""
    import io

    from PIL import Image, ImageDraw

    frames = []
    for sun_y, sky in ((40, (250, 170, 90)), (90, (90, 60, 120))):
        image = Image.new("RGB", (160, 120), sky)
        draw = ImageDraw.Draw(image)
        draw.ellipse((60, sun_y, 100, sun_y + 40), fill=(255, 230, 120))
        draw.rectangle((0, 90, 160, 120), fill=(30, 60, 110))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    return frames[0], frames[1]
