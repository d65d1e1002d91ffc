"""The planner's inputs for one job on this machine: the GPU memory and host memory wanbot may use, and the job's
size in what the planner counts (engine/pipeline/planner.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from engine.config import GenerationConfig
from engine.jobs import GenerationParams
from engine.pipeline.footprint import GIB, Footprint, footprint
from engine.pipeline.models import ModelRef, ModelSpec
from engine.pipeline.planner import JobSize, Machine, NoPlanFits, Plan, candidates, choose, tiling_allows
from engine.pipeline.presets import Preset


def gpu_budget(device: torch.device, config: GenerationConfig) -> int:
    """GPU bytes this process may fill: `generation.vram_gib`, or what is free plus what it holds already, within
    any per-process fraction set on the device (how a smaller card is simulated on a larger one)."""
    if config.vram_gib is not None:
        return int(config.vram_gib * GIB)
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" names no index
    free, total = torch.cuda.mem_get_info(index)
    usable = free + torch.cuda.memory_reserved(index)
    fraction = torch.cuda.get_per_process_memory_fraction(index)
    return int(min(usable, fraction * total))


def host_available() -> int:
    """Host bytes this process may hold: what the kernel calls available, plus what the process holds already."""
    fields = _kib_fields(Path("/proc/meminfo"))
    if "MemAvailable" not in fields:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    own = _kib_fields(Path("/proc/self/status")).get("VmRSS", 0)
    return (fields["MemAvailable"] + own) * 1024


def _kib_fields(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, int] = {}
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0])
    return fields


def this_machine(config: GenerationConfig, device: torch.device, fp8: bool) -> Machine:
    if device.type != "cuda" or config.memory == "cpu":
        return Machine(vram=None, ram=host_available())
    return Machine(
        vram=gpu_budget(device, config),
        ram=host_available(),
        fp8=fp8,
        card=torch.cuda.get_device_name(device),
        vae_bf16=vae_in_bf16(config, device),
    )


def vae_in_bf16(config: GenerationConfig, device: torch.device) -> bool:
    return device.type == "cuda" and config.vae_precision != "fp32"


def job_size(spec: ModelSpec, params: GenerationParams) -> JobSize:
    """The job's frame and the transformer passes it makes: one a step for the fast preset, two with guidance."""
    if params.preset is Preset.FAST and spec.fast is not None:
        passes = spec.fast.sampling.steps
    else:
        passes = params.steps * (2 if params.guidance > 1.0 else 1)
    return JobSize(params.width, params.height, params.frames, passes)


def model_footprint(model: ModelRef, folder: Path | None) -> Footprint:
    return footprint(model.spec.family, folder)


def plan_job(
    model: ModelRef,
    params: GenerationParams,
    machine: Machine,
    config: GenerationConfig,
    folder: Path | None,
    leaner_than: Plan | None = None,
) -> Plan:
    """The plan for `params` on `machine`; raises NoPlanFits saying the largest size that would fit."""
    model_size = model_footprint(model, folder)
    try:
        return choose(model_size, job_size(model.spec, params), machine, config.memory, config.vae_tiling, leaner_than)
    except NoPlanFits as exc:
        hint = _what_fits(model, params, machine, model_size, config.vae_tiling)
        raise NoPlanFits(str(exc.message), hint) from None


def _what_fits(
    model: ModelRef, params: GenerationParams, machine: Machine, model_size: Footprint, vae_tiling: str
) -> str:
    """The model's own sizes, then fewer frames, largest first: the first that fits, as options to ask with."""
    pixels = params.width * params.height
    portrait = params.height > params.width
    turned = {
        name: (height, width) if portrait else (width, height) for name, (width, height) in model.spec.presets.items()
    }
    sizes = sorted(turned.items(), key=lambda item: -item[1][0] * item[1][1])
    tries = [(name, size, params.frames) for name, size in sizes if size[0] * size[1] < pixels]
    frames = params.frames
    while frames > 17:
        frames = (frames // 2) // 4 * 4 + 1  # the models take 4k+1 frames
        tries += [(name, size, frames) for name, size in sizes if size[0] * size[1] <= pixels]
    for name, (width, height), count in tries:
        size = replace(job_size(model.spec, params), width=width, height=height, frames=count)
        if any(plan.fits and tiling_allows(plan, vae_tiling) for plan in candidates(model_size, size, machine)):
            asked = f"res={name}" if width * height != pixels else ""
            more = f"frames={count}" if count != params.frames else ""
            return f"Ask for {' '.join(part for part in (asked, more) if part)}: that fits this GPU."
    return "No size of this model fits this machine: use a smaller model (models.<mode>) or more GPU or host memory."
