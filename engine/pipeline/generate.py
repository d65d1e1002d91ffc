"""Running a Wan 2.2 pipeline for one job: load (and keep warm), place on devices, denoise with progress, decode.

Everything here is blocking and runs in the worker's executor thread; it talks back only through `RunHooks`,
whose callables must be thread-safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image, ImageOps

from engine.config import GenerationConfig, Settings
from engine.errors import ModelUnusable, UserError
from engine.hub.downloads import Downloader
from engine.jobs import GenerationParams, Job, Progress, RunInfo, Stage
from engine.pipeline.encoding import EncodeWhileDecoding
from engine.pipeline.hooks import (
    CANCEL,
    GO_ON,
    INTERRUPT,
    TIMED_OUT,
    GroupBroken,
    JobCancelled,
    JobInterrupted,
    Ranks,
    RunHooks,
)
from engine.pipeline.loras import LoraFiles, LoraSlot, SavedWeights
from engine.pipeline.machine import model_footprint, plan_job, this_machine, vae_in_bf16
from engine.pipeline.models import ModelRef, ModelSpec, resolve_model
from engine.pipeline.passes import PassCounter
from engine.pipeline.placement import Placement, expert_order
from engine.pipeline.planner import Machine, NoPlanFits, Plan, Where, margin
from engine.pipeline.presets import Preset
from engine.pipeline.samplers import scheduled, scheduler_name
from engine.pipeline.speedups import Speedups, apply_speedups, choose_speedups, quantize_fp8
from engine.pipeline.styles import StyleAdapters, StyleFiles
from engine.pipeline.tiny import make_tiny_model
from engine.pipeline.weights import Locator
from engine.storage.images import Mode

log = logging.getLogger(__name__)

# Placements wanbot makes itself and can change in place; diffusers' offload hooks mean a reload.
OWN_PLACEMENTS = {"gpu", "model_offload"}
# Placements whose hooks diffusers puts on the layers at load: an adapter added later would sit outside them.
DIFFUSERS_OFFLOADS = {"group_offload", "sequential_offload"}
PIPELINE_CLASSES = {"WanPipeline": WanPipeline, "WanImageToVideoPipeline": WanImageToVideoPipeline}


class GenerationTimedOut(UserError):
    """The generation ran past `generation.timeout_s`."""


class OutOfMemory(UserError):
    """The accelerator ran out of memory; the message says what to lower."""


@dataclass
class RunOutput:
    frames: np.ndarray  # frames x height x width x 3, float in [0, 1]
    timings: dict[str, float] = field(default_factory=dict)
    info: RunInfo | None = None
    encoded: bool = False  # the frames are in the hooks' `encode_to` already, encoded while they were decoded


@dataclass
class LoadedPipeline:
    model: ModelRef
    pipeline: WanPipeline | WanImageToVideoPipeline
    device: torch.device
    placement: Placement
    folder: Path  # the weights' diffusers folder
    source: str = ""  # the weights loaded: the model's name, or its distilled model's for a fast TI2V
    lora_cache: int = 0  # style adapters kept loaded after their job (generation.lora_cache)
    loras: LoraSlot = field(init=False)
    styles: StyleAdapters = field(init=False)

    def __post_init__(self) -> None:
        self.loras = LoraSlot(self.pipeline, SavedWeights(self.folder), self.placement.editing)
        self.styles = StyleAdapters(self.pipeline, self.device, self.lora_cache)
        self.source = self.source or self.model.name

    def switch_loras(self, pair: LoraFiles | None, styles: list[StyleFiles]) -> None:
        """The fast preset's pair fused in or taken out, then the job's style adapters active at their weights.
        The pair is fused into plain layers only: the style adapters leave first when it changes."""
        if pair != self.loras.files:
            self.styles.drop_all()
        self.loras.switch(pair)
        self.styles.apply(styles)

    @property
    def plan(self) -> Plan:
        return self.placement.plan


ModelLocator = Locator


def default_locator(settings: Settings, downloader: Downloader) -> ModelLocator:
    """Where a model's diffusers folder is: built on first use for `tiny`, the downloaded snapshot for Hub repo ids
    (the worker has the ModelFetcher download it before the job runs)."""

    def locate(model: ModelRef, hooks: RunHooks) -> Path:
        if model.is_tiny:
            return make_tiny_model(settings.models_dir / model.name, model.mode)
        folder = locator.on_disk(model)
        if folder is None:
            raise ModelUnusable(
                f"The model {model.name} is not downloaded.", f"Run: wanbot models download {model.name}"
            )
        return folder

    locator = Locator(settings, downloader, locate)
    return locator


WARMING_UP = "warming up: the first video of this size compiles the model, once"
# A t2v loop's first pass makes the fewest frames Wan makes: only its first frame is used.
LOOP_FIRST_FRAMES = 5
LOOP_FIRST_PASS = "pass 1 of 2: the first frame"
LOOP_SECOND_PASS = "pass 2 of 2: the loop back to it"


class PipelineRunner:
    """Keeps at most one pipeline in memory and runs jobs on it."""

    def __init__(self, config: GenerationConfig, locator: ModelLocator, ranks: Ranks | None = None) -> None:
        self._config = config
        self._locate = locator
        self._ranks = ranks  # a parallel group this runner makes each video with (generation.parallel), or none
        self.loaded: LoadedPipeline | None = None
        # Chosen once (the attention check runs a kernel), logged with each load, applied to each loaded model.
        self._speedups = choose_speedups(config, pick_device(config.device))
        # Video shapes the compiled blocks have run at: the first job of a new shape compiles them again (minutes).
        self._compiled_shapes: set[tuple[str, int, int, int]] = set()
        self._budget: int | None = None  # GPU bytes the latest plan was made for, less its margin
        self._trying: tuple[Plan | None, Path | None] = (None, None)  # the plan being loaded or run, and its folder

    @property
    def speedups(self) -> Speedups:
        return self._speedups

    @property
    def loaded_model(self) -> str | None:
        return self.loaded.model.name if self.loaded else None

    @property
    def held_loras(self) -> set[str]:
        """The style LoRAs the loaded pipeline holds (LoraUse.key): the queue prefers jobs that need no other."""
        return self.loaded.styles.held if self.loaded else set()

    def run(self, job: Job, images: list[Image.Image], hooks: RunHooks) -> RunOutput:
        """Make the job's frames; a job that runs out of GPU memory is tried once more on the next leaner plan.

        A t2v loop is two passes: a short t2v video for its first frame, then the i2v model from that frame back to
        it (params.loop_model). With a parallel group, every rank makes it alike; a rank lost on the way is a
        GroupBroken (the job goes back to the queue, and the next run starts a new group)."""
        if self._ranks is None:
            return self._run(job, images, hooks)
        if self._ranks.prepare():
            self.unload()  # split over a group that is gone
        try:
            self._fetch_all(job, hooks)
            self._ranks.announce(job, images)
            return self._run(job, images, dataclasses.replace(hooks, agree=self._ranks.agree))
        except (JobCancelled, JobInterrupted, UserError, GroupBroken):
            raise
        except Exception as error:
            if self._ranks.lost(error):
                raise GroupBroken(f"a rank of the parallel group was lost during job {job.id}: {error}") from error
            raise

    def _run(self, job: Job, images: list[Image.Image], hooks: RunHooks) -> RunOutput:
        timings: dict[str, float] = {}
        started = hooks.clock()
        model = resolve_model(job.model, job.mode)
        params = job.params
        if params.loop_model is not None and job.mode is Mode.T2V:
            first = params.model_copy(update={"frames": LOOP_FIRST_FRAMES})
            frames, _, _ = self._pass(model, first, images, hooks, timings, LOOP_FIRST_PASS, encode=False)
            start = Image.fromarray((frames[0] * 255).round().astype(np.uint8))
            model, images = resolve_model(params.loop_model, Mode.I2V), [start, start]
            timings = {"first_pass_s": hooks.clock() - started}
        frames, info, encoded = self._pass(
            model, params, images, hooks, timings, LOOP_SECOND_PASS if "first_pass_s" in timings else ""
        )
        timings["generate_s"] = hooks.clock() - started - timings["load_s"]
        return RunOutput(frames=frames, timings=timings, info=info, encoded=encoded)

    def _pass(
        self,
        model: ModelRef,
        params: GenerationParams,
        images: list[Image.Image],
        hooks: RunHooks,
        timings: dict[str, float],
        label: str = "",
        encode: bool = True,
    ) -> tuple[np.ndarray, RunInfo, bool]:
        """One run of a pipeline; out of GPU memory, once more on the next leaner plan."""
        started = hooks.clock()
        forced: Plan | None = None
        while True:
            try:
                loaded = self._ensure_loaded(model, params, hooks, forced)
                timings["load_s"] = timings.get("load_s", 0.0) + hooks.clock() - started
                return self._denoise_and_decode(loaded, params, images, hooks, timings, label, encode)
            except torch.OutOfMemoryError as exc:
                failed, folder = self._trying
                self._free_after_oom()
                forced = self._leaner(model, params, failed, folder) if forced is None else None
                if failed is None or forced is None:
                    raise OutOfMemory(
                        f"The GPU ran out of memory making {params.width}x{params.height}, {params.frames} frames.",
                        "Try a lower resolution (res=480p) or fewer frames.",
                    ) from exc
                log.warning("%s ran out of GPU memory with plan %s; once more with %s", model.name, failed, forced)
                detail = f"the GPU ran out of memory ({failed.memory}); trying once more with {forced.memory}"
                hooks.on_progress(Progress(stage=Stage.LOADING, detail=detail))

    def _plan(self, model: ModelRef, params: GenerationParams, folder: Path | None) -> Plan:
        """The plan a job of `params` gets on this machine (raises NoPlanFits, a UserError, when none fits)."""
        machine = self._machine(params)
        self._budget = None if machine.vram is None else machine.vram - margin(machine.vram)
        return plan_job(model, params, machine, self._config, folder)

    def check_fits(self, model: ModelRef, params: GenerationParams) -> None:
        """Raise NoPlanFits when no placement can make this job on this process's GPU (a CPU makes anything).
        Called from the chats' side while a job runs: it plans, and changes nothing."""
        machine = self._machine(params)
        folder = self._locate.on_disk(model) if machine.vram is not None else None
        if machine.vram is not None and (folder is not None or not model.is_tiny):
            plan = plan_job(model, params, machine, self._config, folder)
            if params.loras:
                _check_carries_loras(plan)

    def parallel_line(self, model: ModelRef) -> str | None:
        """Why this worker's parallel group cannot make `model`'s videos (its attention heads do not divide among
        the ranks), said at start where the model is on disk; None where it can, or nothing can be told yet."""
        folder = self._locate.on_disk(model) if self._ranks is not None else None
        if self._ranks is None or folder is None:
            return None
        try:
            config = json.loads((folder / "transformer" / "config.json").read_text())
            self._ranks.check_heads(int(config["num_attention_heads"]))
        except UserError as error:
            return f"{model.name}: {error}"
        except (OSError, ValueError, KeyError):
            return None  # a folder laid out otherwise: its first job says it, when it loads
        return None

    def plan_line(self, model: ModelRef, params: GenerationParams) -> str | None:
        """The plan a job of `params` gets, or why none fits, in one line; None without a GPU (all runs on the CPU)
        or for a tiny model not built yet."""
        machine = self._machine(params)
        folder = self._locate.on_disk(model) if machine.vram is not None else None
        if machine.vram is None or (folder is None and model.is_tiny):
            return None
        try:
            return plan_job(model, params, machine, self._config, folder).summary()
        except NoPlanFits as exc:
            return f"none fits: {exc}"

    def _machine(self, params: GenerationParams) -> Machine:
        device = pick_device(self._config.device)
        # A style LoRA is a peft adapter beside the expert's layers, which fp8 weights cannot carry: such a job is
        # planned in bf16 (the fast preset's fused pair is no adapter and keeps fp8).
        fp8 = self._speedups.fp8.value == "on" and not params.loras
        return this_machine(self._config, device, fp8=fp8)

    def _leaner(
        self, model: ModelRef, params: GenerationParams, failed: Plan | None, folder: Path | None
    ) -> Plan | None:
        machine = self._machine(params)
        if failed is None or machine.vram is None:
            return None
        try:
            return plan_job(model, params, machine, self._config, folder, leaner_than=failed)
        except NoPlanFits:
            return None

    # -- loading -----------------------------------------------------------------------------------------------

    def _ensure_loaded(
        self, model: ModelRef, params: GenerationParams, hooks: RunHooks, forced: Plan | None = None
    ) -> LoadedPipeline:
        """`model` loaded with the weights `params.preset` runs on, placed by the job's plan. A LoRA pair is fused in
        or taken out in place and a plan of wanbot's own placements replaces another in place; only a distilled
        model of its own (TI2V), fp8 weights (which a LoRA can neither enter nor leave) or diffusers' offload hooks
        mean a reload."""
        source, loras, folder = self._weights(model, params, hooks)
        plan = forced or self._plan(model, params, folder)
        self._trying = (plan, folder)  # what an out-of-memory error, in loading or running, ran out with
        loaded = self.loaded
        if params.loras:
            _check_carries_loras(plan)
        styles = [self._locate.style(use, hooks) for use in params.loras]
        if loaded is not None and self._keeps(loaded, model, source, loras, plan):
            self._replace(loaded, plan)
            loaded.switch_loras(loras, styles)
            return loaded
        del loaded  # the old pipeline's memory is given back in unload, once nothing here holds it
        self.unload()
        hooks.on_progress(Progress(stage=Stage.LOADING, detail=source.name))
        device = torch.device("cpu") if plan.memory == "cpu" else pick_device(self._config.device)
        vae_bf16 = vae_in_bf16(self._config, device)
        pipeline = _load(PIPELINE_CLASSES[model.spec.pipeline], folder, device, plan, vae_bf16)
        correct_flow_shift(pipeline, model.spec)
        pipeline.set_progress_bar_config(disable=True)
        placement = self._placement(pipeline, plan, device)
        loaded = LoadedPipeline(
            model, pipeline, device, placement, folder, source=source.name, lora_cache=self._config.lora_cache
        )
        # Fused where the weights compute (bf16 on a GPU), and before fp8 or compiling see them.
        loaded.loras.switch(loras)
        placement.settle()  # an fp8 plan's experts quantized, one after the other
        apply_speedups(pipeline, self._speedups, quantize=False)
        if self._ranks is not None:
            for transformer in filter(None, (pipeline.transformer, getattr(pipeline, "transformer_2", None))):
                self._ranks.parallelize(transformer)
        self.loaded = loaded
        log.info(
            "loaded model=%s weights=%s device=%s speed-ups: %s\n%s",
            model.name,
            source.name,
            device,
            self._speedups.describe(),
            "\n".join(plan.lines(model_footprint(model, folder))),
        )
        # Kept loaded from here: a style LoRA that fails to load fails its job alone.
        loaded.styles.apply(styles)
        return loaded

    def _weights(
        self, model: ModelRef, params: GenerationParams, hooks: RunHooks
    ) -> tuple[ModelRef, LoraFiles | None, Path]:
        """What `model` runs `params` on, fetched (or built) where missing: the model whose weights load (its own,
        or a fast preset's distilled one), a fast preset's LoRA pair and the weights' folder."""
        fast = model.spec.fast if params.preset is Preset.FAST else None
        source = self._locate.fast_model(model) if fast and fast.weights == "model" else model
        loras = self._locate.loras(model, hooks) if fast and fast.weights == "lora" else None
        folder = self._locate(model, hooks) if source is model else self._locate.fast_model_folder(source, hooks)
        return source, loras, folder

    def _fetch_all(self, job: Job, hooks: RunHooks) -> None:
        """Every file the job loads, fetched here first: the other ranks of a group then find them all on disk, and
        no two fetch (or build) the same files at once."""
        self._weights(resolve_model(job.model, job.mode), job.params, hooks)
        if job.params.loop_model is not None and job.mode is Mode.T2V:
            self._weights(resolve_model(job.params.loop_model, Mode.I2V), job.params, hooks)
        for use in job.params.loras:
            self._locate.style(use, hooks)

    def _placement(self, pipeline: Any, plan: Plan, device: torch.device) -> Placement:
        quantize = quantize_fp8 if plan.fp8 else None
        return Placement(pipeline, plan, device, self._budget, per_block=not self._compiles, quantize=quantize)

    @property
    def _compiles(self) -> bool:
        return self._speedups.compile.value == "on"

    def _keeps(
        self, loaded: LoadedPipeline, model: ModelRef, source: ModelRef, loras: LoraFiles | None, plan: Plan
    ) -> bool:
        """Whether the loaded pipeline can serve: the same weights, a LoRA it can switch, a placement it can take."""
        if (loaded.model.name, loaded.source) != (model.name, source.name):
            return False
        old = loaded.plan
        if old.fp8 != plan.fp8:
            return False  # weights quantized (or not) at load: a job with style LoRAs runs in bf16
        if plan.fp8 and (loaded.loras.files != loras or old.placement != plan.placement):
            return False
        return old.placement == plan.placement or {old.memory, plan.memory} <= OWN_PLACEMENTS

    def _replace(self, loaded: LoadedPipeline, plan: Plan) -> None:
        if loaded.plan.placement == plan.placement:
            loaded.placement.plan = plan  # the same parts in the same places; the tiling follows the job
            return
        loaded.placement.remove()
        loaded.placement = self._placement(loaded.pipeline, plan, loaded.device)
        loaded.loras.editing = loaded.placement.editing
        lines = plan.lines(model_footprint(loaded.model, loaded.folder))
        log.info("plan changed for %s:\n%s", loaded.model.name, "\n".join(lines))

    def close(self) -> None:
        """The pipeline unloaded and a parallel group's other ranks stopped."""
        self.unload()
        if self._ranks is not None:
            self._ranks.close()

    def unload(self) -> None:
        if self.loaded is None:
            return
        self.loaded.placement.remove()
        self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.accelerator.empty_host_cache()  # the pinned buffers of swapped parts, cached until told

    def _free_after_oom(self) -> None:
        # A pipeline half-way through an OOM may hold fragmented blocks; reloading costs less than a second failure.
        if self.loaded is not None and hasattr(self.loaded.pipeline, "maybe_free_model_hooks"):
            self.loaded.pipeline.maybe_free_model_hooks()
        self.unload()

    # -- running -----------------------------------------------------------------------------------------------

    def _denoise_and_decode(
        self,
        loaded: LoadedPipeline,
        params: GenerationParams,
        images: list[Image.Image],
        hooks: RunHooks,
        timings: dict[str, float],
        label: str = "",
        encode: bool = True,
    ) -> tuple[np.ndarray, RunInfo, bool]:
        spec = loaded.model.spec
        pipeline = loaded.pipeline
        plan = loaded.plan
        loaded.placement.evict_all()  # nothing a cancelled job's prefetch left behind
        if plan.vae_tiled:
            pipeline.vae.enable_tiling()
        else:
            pipeline.vae.disable_tiling()
        shape = (loaded.model.name, params.width, params.height, params.frames)
        compiled = self._speedups.compile.value == "on"
        warming_up = compiled and shape not in self._compiled_shapes
        placement = loaded.placement

        def prefetch(pipeline: Any, step: int) -> None:
            placement.on_step_end(step, expert_order(pipeline, spec.boundary_ratio), plan.activations)

        first_note = WARMING_UP if warming_up else ""
        tracker = StepTracker(spec, params.steps, hooks, first_note, after_step=prefetch, label=label)
        arguments: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt or None,
            "height": params.height,
            "width": params.width,
            "num_frames": params.frames,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "generator": torch.Generator(device="cpu").manual_seed(params.seed),
            # A follower's frames are thrown away: no decode, unless a loop's second pass starts from them.
            "output_type": "np" if hooks.decode or not encode else "latent",
            "callback_on_step_end": tracker.on_step_end,
        }
        if spec.two_experts and params.guidance_2 is not None:
            arguments["guidance_scale_2"] = params.guidance_2
        if spec.pipeline == "WanImageToVideoPipeline":
            arguments["image"] = cover(images[0], params.width, params.height)
            if len(images) > 1 and spec.uses_end_image:
                arguments["last_image"] = cover(images[1], params.width, params.height)
        sampling = spec.fast.sampling if params.preset is Preset.FAST and spec.fast else None
        # A tiled decode makes tiles, not frames: its video is encoded afterwards.
        part = None if plan.vae_tiled or not encode else hooks.encode_to
        encoder = EncodeWhileDecoding(pipeline, params.fps, part) if part is not None else None
        tracker.start()
        try:
            with (
                tracker.watching(pipeline),
                scheduled(pipeline, sampling, params.seed) as scheduler,
                PassCounter(pipeline) as passes,
                encoder or contextlib.nullcontext(),
            ):
                output = pipeline(**arguments)
                sigmas = [round(sigma, 4) for sigma in scheduler.sigmas.tolist()]
        except BaseException:
            if hasattr(pipeline, "maybe_free_model_hooks"):
                pipeline.maybe_free_model_hooks()
            raise
        if compiled:
            self._compiled_shapes.add(shape)
        timings["denoise_s"] = tracker.denoise_s
        timings["decode_s"] = hooks.clock() - tracker.decode_started
        info = RunInfo(
            preset=params.preset,
            loras=loaded.loras.names,
            styles=[f"{use.label} ({', '.join(f'{use.repo}/{name}' for name in use.files)})" for use in params.loras],
            scheduler=scheduler_name(scheduler, sampling),
            sigmas=sigmas,
            transformer_calls=passes.calls,
            speedups=self._speedups.metadata(),
        )
        return output.frames[0], info, encoder is not None and encoder.encoded


class StepTracker:
    """Turns the pipeline's per-step callback into progress with an ETA, and into cancel and timeout checks."""

    def __init__(
        self,
        spec: ModelSpec,
        steps: int,
        hooks: RunHooks,
        first_note: str = "",
        after_step: Callable[[Any, int], None] | None = None,
        label: str = "",
    ) -> None:
        """`first_note` is said until the first step ends (a first step that compiles takes minutes); `after_step`
        runs after each step (the placement's prefetch); `label` goes with every step (a loop's pass)."""
        self._after_step = after_step
        self._label = label
        self._passes_started = False
        self._spec = spec
        self._steps = steps
        self._hooks = hooks
        self._first_note = first_note
        self._durations: dict[str, list[float]] = {}
        self._last = 0.0
        self._deadline = 0.0
        self._started = 0.0
        self.denoise_s = 0.0
        self.decode_started = 0.0

    def start(self) -> None:
        self._started = self._last = self._hooks.clock()
        self._deadline = self._started + self._hooks.timeout_s
        detail = ", ".join(part for part in (self._label, self._first_note, self._expert(1000)) if part)
        self._hooks.on_progress(Progress(stage=Stage.DENOISING, step=0, total=self._steps, detail=detail))

    @contextlib.contextmanager
    def watching(self, pipeline: Any) -> Iterator[None]:
        """While the block runs: live previews, when the run makes them, from the pipeline's transformers; and the
        first step timed from the first transformer pass, not from the call (the prompt's encoding, an image's VAE
        encode and the first swap before it made the first step's time left many times too long)."""
        previews = self._hooks.previews
        with contextlib.ExitStack() as stack:
            if previews is not None:
                stack.enter_context(previews.attached(pipeline))
            for name in ("transformer", "transformer_2"):
                expert = getattr(pipeline, name, None)
                if expert is not None:
                    stack.callback(expert.register_forward_pre_hook(self._first_pass).remove)
            yield

    def _first_pass(self, _module: Any, _args: Any) -> None:
        if not self._passes_started:
            self._passes_started = True
            self._last = self._hooks.clock()

    def _expert(self, timestep: float) -> str:
        if not self._spec.two_experts:
            return ""
        # Users are told the part, not the expert's name: the high-noise expert makes the first part of the steps.
        boundary = (self._spec.boundary_ratio or 0) * 1000
        return "part 1 of 2" if timestep >= boundary else "part 2 of 2"

    def on_step_end(self, pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._after_step is not None:
            self._after_step(pipeline, step)
        now = self._hooks.clock()
        expert = self._expert(float(timestep))
        self._durations.setdefault(expert, []).append(now - self._last)
        self._last = now
        decision = (
            INTERRUPT
            if self._hooks.should_interrupt()
            else CANCEL
            if self._hooks.should_cancel()
            else TIMED_OUT
            if now > self._deadline
            else GO_ON
        )
        decision = self._hooks.agree(decision)  # a parallel group's ranks stop at the same step, or go on together
        if decision == INTERRUPT:
            raise JobInterrupted
        if decision == CANCEL:
            raise JobCancelled
        if decision == TIMED_OUT:
            raise GenerationTimedOut(
                f"The video took longer than the limit of {self._hooks.timeout_s:.0f} s.",
                "Try fewer steps, fewer frames or a lower resolution.",
            )
        done = step + 1
        finish = self._hooks.finish
        if done < self._steps:
            # The decode and encode after the steps take seconds: a time left without them ends in "0s" too early.
            eta_s = self._steps_left_s(done) + (finish.total_s if finish else 0.0)
            self._hooks.on_progress(
                Progress(
                    stage=Stage.DENOISING,
                    step=done,
                    total=self._steps,
                    eta_s=eta_s,
                    eta_steps_only=finish is None,
                    detail=", ".join(part for part in (self._label, expert) if part),
                )
            )
        else:
            self.denoise_s = now - self._started
            self.decode_started = now
            eta_s = finish.total_s if finish else None
            self._hooks.on_progress(Progress(stage=Stage.DECODING, step=done, total=self._steps, eta_s=eta_s))
        return {}

    def _steps_left_s(self, done: int) -> float:
        """Remaining steps times the mean step time of the expert that will run them (steps differ per expert)."""
        all_steps = [duration for durations in self._durations.values() for duration in durations]
        mean = sum(all_steps) / len(all_steps)
        latest = next(reversed(self._durations))
        expert_mean = sum(self._durations[latest]) / len(self._durations[latest])
        return (self._steps - done) * (expert_mean if len(self._durations[latest]) > 1 else mean)


def _check_carries_loras(plan: Plan) -> None:
    """Refuse a job with style LoRAs whose plan is one of diffusers' offloads, which cannot carry adapters."""
    if plan.memory in DIFFUSERS_OFFLOADS:
        raise UserError(
            f"This server's GPU needs {plan.memory.replace('_', ' ')} for this video, which cannot carry LoRAs.",
            "Ask again without lora=, or for a smaller video (res=480p, fewer frames).",
        )


def cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` cropped about its middle to the video's shape and scaled to its size: the pipelines would stretch it,
    and the shape differs after snapping to the model's multiple, or on purpose for very wide or tall pictures."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def describe_device(config: GenerationConfig) -> str:
    """Where jobs will run, for the start-up line: a CPU-only torch on a GPU server means hours per real video."""
    device = pick_device(config.device)
    if device.type == "cpu":
        return "the CPU (no CUDA GPU found: fine for the tiny models, hours per video for real ones)"
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    name = torch.cuda.get_device_name(device)
    return f"{device} ({name}, {free_bytes / 2**30:.0f} of {total_bytes / 2**30:.0f} GiB free, memory={config.memory})"


def device_facts(config: GenerationConfig) -> tuple[str, str | None, int | None]:
    """The device jobs run on, its GPU's name and its free memory in bytes (None on a CPU), for the fleet view."""
    device = pick_device(config.device)
    if device.type == "cpu":
        return "cpu", None, None
    try:
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return str(device), torch.cuda.get_device_name(device), free_bytes
    except (AssertionError, RuntimeError, ValueError) as exc:  # torch's words for "no such GPU here"
        raise UserError(
            f"generation.device is {config.device}, which this machine cannot use: {exc}.",
            "Give a GPU this machine has (nvidia-smi lists them; cuda:0 is the first), or cpu.",
        ) from None


def pick_device(configured: str) -> torch.device:
    if configured != "auto":
        return torch.device(configured)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(pipeline_class: Any, folder: Path, device: torch.device, plan: Plan, vae_bf16: bool) -> Any:
    """The pipeline from `folder`: bf16 on a GPU (the VAE too where `vae_bf16`); straight onto it when every part
    stays there, so host memory never holds the model."""
    if device.type == "cpu":
        return pipeline_class.from_pretrained(folder, dtype=torch.float32)
    dtype = {"default": torch.bfloat16, "vae": torch.bfloat16 if vae_bf16 else torch.float32}
    if plan.memory == "gpu" and plan.text_encoder is Where.GPU and not plan.fp8:
        with torch.cuda.device(device):  # diffusers' device map names the current device
            return pipeline_class.from_pretrained(folder, dtype=dtype, device_map="cuda")
    return pipeline_class.from_pretrained(folder, dtype=dtype)


def correct_flow_shift(pipeline: Any, spec: ModelSpec) -> None:
    """The conversion script wrote flow_shift=3.0 into the A14B repos; the official values are 12 (t2v) and 5 (i2v)."""
    if spec.flow_shift is None or pipeline.scheduler.config.get("flow_shift") == spec.flow_shift:
        return
    pipeline.scheduler = UniPCMultistepScheduler.from_config(pipeline.scheduler.config, flow_shift=spec.flow_shift)
