"""The Wan VAEs' decode: untiled against tiled (seconds, peak memory), and bf16 against fp32 (error, seconds, memory).

Both VAEs are built at their real configurations with random weights (nothing is downloaded): the Wan 2.1 VAE of
T2V-A14B and I2V-A14B (`AutoencoderKLWan()`, 0.13 B parameters, 8x spatial compression, 16 latent channels) and the
Wan 2.2 VAE of TI2V-5B (bench/gpu.py's TI2V_VAE, 0.70 B, 16x, 48 channels). For each VAE and size the latents are
random normal, [1, z_dim, (frames - 1) // 4 + 1, height / 8 or 16, width / 8 or 16], and `vae.decode(latents).sample`
runs under torch.no_grad() on the device present (CUDA if available, else the CPU). Three figures, one JSON line each:

- `untiled`: `vae.disable_tiling()`, fp32: wall seconds and peak memory (also bytes per output pixel-frame, and the
  share of output pixels clamped at +-1, which tells how far random weights are from a real decoder's output).
- `tiled`: `vae.enable_tiling()` with diffusers' default tiles (256 px, stride 192), fp32: the same, plus the tile
  count and the difference from the untiled output (the blended seams). diffusers tiles only a video larger than one
  tile, so a size of 256x256 or less is reported as skipped.
- `bf16`: the same random weights, built in fp32, deep-copied and cast to bf16, decoding the same latents untiled:
  seconds and peak memory, and its error against the fp32 untiled output, both on the VAE's [-1, 1] pixels (max and
  mean absolute error) and on the 8-bit levels a video gets ((x + 1) / 2 * 255 rounded, as diffusers' video processor
  does: max and mean absolute difference, share of values that differ). The error of random weights is a stand-in:
  re-measure it with the trained weights before choosing bf16 for the VAE.

Peak memory on CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was allocated
before the decode (weights and latents). On a CPU each figure runs in a fresh subprocess of this script, so one
decode's allocations cannot hide another's; the peak is the growth of VmHWM (/proc/self/status) across the decode,
after building the model, with the high-water mark reset to the resident set right before the decode (written 5 to
/proc/self/clear_refs; where that fails, growth over the previous high-water mark). It counts resident pages, not
tensors: allocator slack, thread buffers and libraries are in it, so take it as an upper-bound-ish host measure.
The CPU seconds are those of a cold first decode (no warm-up: one would leave freed pages for the measured decode to
reuse, hiding part of its peak).

Default sizes: on CUDA the real ones (Wan 2.1 VAE 832x480x81 and 1280x720x81, Wan 2.2 VAE 1280x704x121); on a CPU
small ones that run in minutes on two cores (256x256x5, 256x256x9, 384x384x5), enough to see how the peak grows with
pixels and with frames; those seconds say nothing about a GPU.

    .venv/bin/python bench/vae.py [--vaes wan2.1,wan2.2] [--sizes 832x480x81,1280x720x81] [--figures untiled,tiled,bf16]
        [--device cuda|cpu] [--budget-s 520] [--seed 0] [--out figures.jsonl]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.utils import logging as diffusers_logging

from engine.pipeline.footprint import A14B_VAE, TI2V_VAE

VAES: dict[str, dict[str, Any]] = {"wan2.1": A14B_VAE, "wan2.2": TI2V_VAE}
FIGURES = ("untiled", "tiled", "bf16")
CUDA_SIZES = {"wan2.1": "832x480x81,1280x720x81", "wan2.2": "1280x704x121"}
CPU_SIZES = "256x256x5,256x256x9,384x384x5"


@dataclass(frozen=True)
class Task:
    """One figure: which VAE, at what size (pixels, frames), on what device."""

    vae: str
    figure: str
    width: int
    height: int
    frames: int
    device: str
    seed: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"

    @property
    def pixel_frames(self) -> int:
        return self.width * self.height * self.frames


class References:
    """fp32 untiled outputs for the bf16 figure of the same VAE and size: in memory, or in a folder across processes."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.kept: dict[str, torch.Tensor] = {}

    def put(self, task: Task, output: torch.Tensor) -> None:
        key = f"{task.vae}-{task.size}-{task.seed}"
        if self.folder is None:
            self.kept[key] = output.cpu()
        else:
            torch.save(output.cpu(), self.folder / f"{key}.pt")

    def get(self, task: Task) -> torch.Tensor | None:
        key = f"{task.vae}-{task.size}-{task.seed}"
        if self.folder is None:
            return self.kept.get(key)
        path = self.folder / f"{key}.pt"
        return torch.load(path) if path.exists() else None


class Models:
    """The fp32 VAE of each name, built once with the task's seed, and its bf16 copy when a figure asks for it."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.built: dict[tuple[str, torch.dtype], AutoencoderKLWan] = {}
        self.build_s: dict[str, float] = {}

    def get(self, name: str, dtype: torch.dtype, seed: int) -> AutoencoderKLWan:
        if (name, torch.float32) not in self.built:
            self.drop_all()
            start = time.perf_counter()
            torch.manual_seed(seed)
            self.built[name, torch.float32] = AutoencoderKLWan(**VAES[name]).eval().to(self.device)
            self.build_s[name] = time.perf_counter() - start
        if (name, dtype) not in self.built:
            self.built[name, dtype] = copy.deepcopy(self.built[name, torch.float32]).to(dtype)
        return self.built[name, dtype]

    def drop_all(self) -> None:
        self.built.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_size(task: Task) -> None:
    spatial = VAES[task.vae].get("scale_factor_spatial", 8)
    if task.width % spatial or task.height % spatial or task.frames < 1 or (task.frames - 1) % 4:
        raise SystemExit(f"{task.vae}: {task.size} needs width and height divisible by {spatial} and frames = 4k + 1")


def latents_for(vae: AutoencoderKLWan, task: Task) -> torch.Tensor:
    spatial = vae.spatial_compression_ratio
    shape = (1, vae.config.z_dim, (task.frames - 1) // 4 + 1, task.height // spatial, task.width // spatial)
    return torch.randn(shape, generator=torch.Generator().manual_seed(task.seed + 1))


def tile_count(task: Task) -> int:
    """Tiles diffusers' tiled_decode decodes with its default tiles; 0 where it decodes untiled (the video fits one)."""
    with torch.device("meta"):
        vae = AutoencoderKLWan(**VAES[task.vae])
    spatial = vae.spatial_compression_ratio
    height, width = task.height // spatial, task.width // spatial
    if width <= vae.tile_sample_min_width // spatial and height <= vae.tile_sample_min_height // spatial:
        return 0
    rows = len(range(0, height, vae.tile_sample_stride_height // spatial))
    columns = len(range(0, width, vae.tile_sample_stride_width // spatial))
    return rows * columns


def proc_status_mib() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def timed_decode(vae: AutoencoderKLWan, latents: torch.Tensor, device: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """One decode: the output, wall seconds and the peak memory it added over what was there before."""
    latents = latents.to(device, vae.dtype)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.no_grad():
            output = vae.decode(latents).sample
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        memory = {"peak_mib": peak, "memory_measure": "cuda max_memory_allocated growth", "before_mib": before / 2**20}
        return output, {"decode_s": seconds, **memory}
    was_reset = reset_high_water_mark()
    status_before = proc_status_mib()
    start = time.perf_counter()
    with torch.no_grad():
        output = vae.decode(latents).sample
    seconds = time.perf_counter() - start
    status_after = proc_status_mib()
    memory = {
        "peak_mib": status_after["VmHWM"] - status_before["VmHWM"],
        "memory_measure": "VmHWM growth, HWM reset before" if was_reset else "VmHWM growth over previous HWM",
        "rss_before_mib": status_before["VmRSS"],
        "hwm_before_mib": status_before["VmHWM"],
        "hwm_after_mib": status_after["VmHWM"],
    }
    return output, {"decode_s": seconds, **memory}


def to_levels(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels as the 8-bit levels of the video (diffusers' postprocess: (x / 2 + 0.5) * 255, rounded)."""
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round()


def differences(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    output, reference = output.float().cpu(), reference.float().cpu()
    error = (output - reference).abs()
    levels = (to_levels(output) - to_levels(reference)).abs()
    return {
        "max_abs_err": error.max().item(),
        "mean_abs_err": error.mean().item(),
        "max_level_diff": levels.max().item(),
        "mean_level_diff": levels.mean().item(),
        "share_levels_differ": (levels > 0).float().mean().item(),
    }


def run_task(task: Task, models: Models, references: References) -> dict[str, Any]:
    dtype = torch.bfloat16 if task.figure == "bf16" else torch.float32
    vae = models.get(task.vae, dtype, task.seed)
    latents = latents_for(vae, task)
    figures: dict[str, Any] = {"what": f"{task.vae} VAE decode, {task.figure}", "size": task.size}
    figures["dtype"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    figures["latent_shape"] = list(latents.shape)
    if task.figure == "tiled":
        vae.enable_tiling()
        figures["tiles"] = tile_count(task)
    else:
        vae.disable_tiling()
    output, measured = timed_decode(vae, latents, task.device)
    figures.update(measured)
    figures["peak_bytes_per_pixel_frame"] = figures["peak_mib"] * 2**20 / task.pixel_frames
    figures["output_mib"] = output.numel() * output.element_size() / 2**20
    figures["build_s"] = models.build_s[task.vae]
    if task.figure == "untiled":
        figures["saturated_share"] = (output.abs() >= 1).float().mean().item()
        references.put(task, output)
    elif task.figure == "tiled":
        reference = references.get(task)
        if reference is not None:
            figures.update({f"{key}_vs_untiled": value for key, value in differences(output, reference).items()})
    else:
        reference = references.get(task)
        if reference is None:  # no untiled figure ran before at this size: decode the reference here
            output = output.cpu()
            fp32 = models.get(task.vae, torch.float32, task.seed)
            fp32.disable_tiling()
            with torch.no_grad():
                reference = fp32.decode(latents.to(task.device)).sample
        figures.update(differences(output, reference))
        figures["reference"] = "fp32 untiled decode, same weights and latents (random weights: a stand-in)"
    return figures


def warm_up(models: Models, task: Task) -> None:
    """A small decode first on CUDA, so that context and kernel loading do not land in the first figure."""
    vae = models.get(task.vae, torch.bfloat16 if task.figure == "bf16" else torch.float32, task.seed)
    vae.disable_tiling()
    spatial = vae.spatial_compression_ratio
    small = Task(task.vae, task.figure, spatial * 4, spatial * 4, 5, task.device, task.seed)
    with torch.no_grad():
        vae.decode(latents_for(vae, small).to(task.device, vae.dtype))


def run_in_subprocess(task: Task, folder: Path) -> dict[str, Any]:
    """A fresh process per figure on the CPU: VmHWM is per process, and one decode's pages must not hide another's."""
    result = folder / "result.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(task))]
    completed = subprocess.run([*command, "--child-folder", str(folder)], check=False)
    if completed.returncode != 0 or not result.exists():
        return {"what": f"{task.vae} VAE decode, {task.figure}", "size": task.size, "error": completed.returncode}
    return json.loads(result.read_text())


def child(task_json: str, folder: Path) -> None:
    task = Task(**json.loads(task_json))
    figures = run_task(task, Models(task.device), References(folder))
    (folder / "result.json").write_text(json.dumps(figures))


def report(figures: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(figures)
    print(line, flush=True)
    if out:
        with out.open("a") as file:
            file.write(line + "\n")


def parse_size(text: str) -> tuple[int, int, int]:
    width, height, frames = (int(part) for part in text.split("x"))
    return width, height, frames


def plan(vaes: str, sizes: str | None, figures: str, device: str, seed: int) -> list[Task]:
    """Every figure asked for, VAE by VAE and size by size, checked before anything runs."""
    tasks = []
    for name in vaes.split(","):
        if name not in VAES:
            raise SystemExit(f"unknown VAE {name!r}: choose from {', '.join(VAES)}")
        default = CUDA_SIZES[name] if device == "cuda" else CPU_SIZES
        for width, height, frames in (parse_size(size) for size in (sizes or default).split(",")):
            for figure in figures.split(","):
                if figure not in FIGURES:
                    raise SystemExit(f"unknown figure {figure!r}: choose from {', '.join(FIGURES)}")
                tasks.append(Task(name, figure, width, height, frames, device, seed))
                check_size(tasks[-1])
    return tasks


def run_on_cuda(task: Task, models: Models, references: References, warmed: set[tuple[str, str]]) -> dict[str, Any]:
    key = (task.vae, "bf16" if task.figure == "bf16" else "fp32")
    if key not in warmed:
        warm_up(models, task)
        warmed.add(key)
    try:
        return run_task(task, models, references)
    except RuntimeError as error:  # out of memory, or a tensor too large for a kernel: go on with the rest
        return {"what": f"{task.vae} VAE decode, {task.figure}", "size": task.size, "error": str(error)}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vaes", default="wan2.1,wan2.2", help="which VAEs, in order")
    parser.add_argument("--sizes", help="WIDTHxHEIGHTxFRAMES,... for every VAE (default: per device, see above)")
    parser.add_argument("--figures", default=",".join(FIGURES), help="which figures, in order for each size")
    parser.add_argument("--budget-s", type=float, help="start no figure past this many seconds (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append each figure here as a JSON line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Quiet diffusers' warning about casting with .to(): the bf16 copy is cast on purpose, every module included.
    diffusers_logging.set_verbosity_error()
    if args.child:
        child(args.child, args.child_folder)
        return
    tasks = plan(args.vaes, args.sizes, args.figures, args.device, args.seed)
    cuda = args.device == "cuda"
    device = {"what": "device", "name": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__}
    report({**device, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}, args.out)
    start = time.monotonic()
    models = Models(args.device)
    warmed: set[tuple[str, str]] = set()
    with tempfile.TemporaryDirectory() as folder:
        references = References(None if cuda else Path(folder))
        for task in tasks:
            figures: dict[str, Any] = {"what": f"{task.vae} VAE decode, {task.figure}", "size": task.size}
            if args.budget_s is not None and time.monotonic() - start > args.budget_s:
                figures["skipped"] = f"past the budget of {args.budget_s:.0f} s"
            elif task.figure == "tiled" and tile_count(task) == 0:
                figures["skipped"] = "fits in one 256 px tile: diffusers decodes it untiled, as the untiled figure"
            elif cuda:
                figures = run_on_cuda(task, models, references, warmed)
            else:
                figures = run_in_subprocess(task, Path(folder))
            report(figures, args.out)


if __name__ == "__main__":
    main()
