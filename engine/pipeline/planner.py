"""The placement planner: where each part of a model lives for one job, on this machine, and why.

A pure function of the model's footprint (engine/pipeline/footprint.py), the job's size and preset, and the memory
the machine offers. Every placement wanbot knows is costed (peak GPU memory, host memory it pins, seconds per
video from the measured per-step figures), and `auto` takes the fastest one that fits with a margin:

- gpu: everything stays on the GPU (the transformers in fp8 where the speed-up is on); the text encoder waits in
  pinned host memory and comes in only to encode when staying would not leave the experts room.
- model_offload: one transformer on the GPU at a time, the others in pinned host memory, swapped in on a side
  stream (engine/pipeline/placement.py), a block at a time so the first blocks compute while the rest copy.
- group_offload: the transformers streamed from pinned host memory a block at a time, copies overlapped with
  compute (diffusers' group offloading with CUDA streams).
- sequential_offload: layer by layer (diffusers), the least memory and the slowest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from engine.errors import UserError
from engine.pipeline.footprint import GIB, Footprint

PLAN_NAMES = ("gpu", "model_offload", "group_offload", "sequential_offload")
# Pinned host to GPU over PCIe 4.0 x16 (about 25 GB/s in practice); pageable memory copies at about 1 GB/s.
PINNED_BYTES_PER_S = 20e9
LEAF_BYTES_PER_S = 8e9  # sequential offload: one small copy per layer, no streams
FP8_SPEEDUP = 1.3  # fp8 matmuls against bf16 on Hopper, as reported for Wan (to be measured)
STREAM_OVERHEAD = 1.25  # group offload with streams: the first block of each pass is not hidden (to be measured)
HOOK_S = 0.0005  # an offload hook's own time per block and pass
FP8_SHARE = 0.53  # torchao float8 weights: a byte per weight plus scales; norms and embeddings stay bf16
TEXT_ACTIVATIONS = 0.5 * GIB  # UMT5-XXL over 512 tokens, prompt and negative prompt
# cuBLAS workspaces and rope tables: the resident figures measured on the H200 hold about this above the weights.
RUNTIME_BYTES = int(0.3 * GIB)
HOST_BASE = 3 * GIB  # Python, torch, CUDA's host side, the chats and the queue
TEXT_ENCODE_S = 0.05  # resident, warm (H200)
# libx264 veryfast with frame threads, about 0.7 s for 1280x704x121 on 16 cores (bench/encode.py's estimate); a
# whole decode hides it (the frames are encoded as they are decoded), a tiled one adds it.
ENCODE_S_PER_PIXEL_FRAME = 0.7 / (1280 * 704 * 121)
# Kept free on the GPU: the allocator's fragmentation and the kernels' workspaces are not in the measured peaks.
MARGIN_SHARE = 0.08
MARGIN_MIN = 1.0 * GIB
H100_BF16_TFLOPS = 989.0
# Dense bf16 tensor-core peaks (no sparsity), by a fragment of the GPU's name; unknown cards are costed as an H100.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A6000": 155.0,
    "5090": 209.0,
    "4090": 165.0,
    "3090": 71.0,
}


class Where(StrEnum):
    GPU = "on the GPU"
    GPU_FP8 = "on the GPU in fp8"
    SWAPPED = "in pinned host memory, swapped onto the GPU while it runs"
    STREAMED = "streamed from pinned host memory a block at a time"
    LAYERS = "streamed from host memory a layer at a time"
    CPU = "on the CPU"

    @property
    def short(self) -> str:
        """For a table column."""
        return SHORT_WHERE[self]


SHORT_WHERE = {
    Where.GPU: "GPU",
    Where.GPU_FP8: "GPU, fp8",
    Where.SWAPPED: "swapped in",
    Where.STREAMED: "streamed",
    Where.LAYERS: "by layer",
    Where.CPU: "CPU",
}


@dataclass(frozen=True)
class Machine:
    """The memory a plan may use: `vram` None means no GPU."""

    vram: int | None
    ram: int
    fp8: bool = False  # generation.fp8 is on and works on this card
    card: str = ""
    vae_bf16: bool = False  # generation.vae_precision: the VAE in bf16

    @property
    def peak_tflops(self) -> float:
        return next((tflops for part, tflops in PEAK_BF16_TFLOPS.items() if part in self.card), H100_BF16_TFLOPS)


@dataclass(frozen=True)
class JobSize:
    width: int
    height: int
    frames: int
    passes: int  # transformer passes a video makes (fast A14B 4, quality A14B 80)

    @property
    def pixel_frames(self) -> int:
        return self.width * self.height * self.frames

    def describe(self) -> str:
        return f"{self.width}x{self.height}, {self.frames} frames"


@dataclass(frozen=True)
class Plan:
    memory: str  # one of PLAN_NAMES, or "cpu"
    text_encoder: Where
    experts: Where
    vae_tiled: bool
    vram: int  # expected peak on the GPU, bytes
    ram: int  # host memory the process holds with it, bytes
    seconds: float | None  # expected for one video on this card, from the measured figures
    why: str = ""
    fits: bool = True
    phases: tuple[tuple[str, int], ...] = ()  # peak bytes while encoding, denoising, decoding
    activations: int = 0  # a pass's peak above the weights, bytes
    vae_bf16: bool = False

    @property
    def fp8(self) -> bool:
        return self.experts is Where.GPU_FP8

    @property
    def placement(self) -> tuple[str, Where, Where]:
        """What loading must set up; a plan that differs only in VAE tiling needs no re-placing."""
        return (self.memory, self.text_encoder, self.experts)

    def summary(self) -> str:
        """The plan in one line, for the start-up and the log."""
        seconds = f", about {self.seconds:.0f} s a video" if self.seconds is not None else ""
        return (
            f"{self.memory}: text encoder {self.text_encoder.short}, transformers {self.experts.short}, VAE decoding "
            f"{'tiled' if self.vae_tiled else 'whole'}; peak {self.vram / GIB:.1f} GiB GPU, {self.ram / GIB:.0f} GiB "
            f"host{seconds}"
        )

    def lines(self, footprint: Footprint) -> list[str]:
        experts = "transformers" if len(footprint.experts) > 1 else "transformer"
        seconds = f", about {self.seconds:.0f} s a video" if self.seconds is not None else ""
        return [
            f"plan: {self.memory} (peak {self.vram / GIB:.1f} GiB on the GPU, {self.ram / GIB:.1f} GiB host "
            f"memory{seconds})",
            f"  text encoder ({footprint.text_encoder / GIB:.1f} GiB): {self.text_encoder}",
            f"  {experts} ({' + '.join(f'{size / GIB:.1f}' for size in footprint.experts)} GiB): {self.experts}",
            f"  VAE ({footprint.vae / (2 if self.vae_bf16 else 1) / GIB:.1f} GiB"
            f"{' in bf16' if self.vae_bf16 else ''}): {'on the CPU' if self.memory == 'cpu' else 'on the GPU'}, "
            f"decoding {'tiled' if self.vae_tiled else 'whole'}",
            f"  why: {self.why}",
        ]


class NoPlanFits(UserError):
    """No placement fits the job on this machine; the hint says what would."""

    def __init__(self, message: str, hint: str = "Ask for a lower resolution or fewer frames.") -> None:
        super().__init__(message, hint)


def margin(vram: int) -> int:
    return max(int(vram * MARGIN_SHARE), int(MARGIN_MIN))


def candidates(footprint: Footprint, size: JobSize, machine: Machine) -> list[Plan]:
    """Every placement of the model for this job, costed, fastest first; `fits` says which this machine holds."""
    if machine.vae_bf16:
        footprint = footprint.in_bf16_vae()
    if machine.vram is None:
        total = footprint.text_encoder + sum(footprint.experts) + footprint.vae
        why = "no CUDA GPU, or generation.memory is cpu: all on the CPU"
        return [Plan("cpu", Where.CPU, Where.CPU, False, 0, HOST_BASE + total, None, why)]
    plans = [
        plan
        for tiled in (False, True)
        for plan in (
            _gpu(footprint, size, machine, tiled, text_stays=True),
            _gpu(footprint, size, machine, tiled, text_stays=False),
            _model_offload(footprint, size, machine, tiled),
            _group_offload(footprint, size, machine, tiled),
            _sequential(footprint, size, machine, tiled),
        )
        if plan is not None
    ]
    budget = machine.vram - margin(machine.vram)
    costed = [
        replace(plan, fits=plan.vram <= budget and plan.ram <= machine.ram, vae_bf16=machine.vae_bf16) for plan in plans
    ]
    return sorted(costed, key=lambda plan: plan.seconds or 0.0)


def choose(
    footprint: Footprint,
    size: JobSize,
    machine: Machine,
    memory: str = "auto",
    vae_tiling: str = "auto",
    leaner_than: Plan | None = None,
) -> Plan:
    """The fastest plan that fits (`memory` "auto"), or the named one with the best tiling for it.

    `leaner_than`: a plan that ran out of memory; the answer needs less GPU memory than it did. Raises NoPlanFits.
    """
    plans = [plan for plan in candidates(footprint, size, machine) if tiling_allows(plan, vae_tiling)]
    if leaner_than is not None:
        plans = [plan for plan in plans if plan.vram < leaner_than.vram]
    if memory not in ("auto", "cpu") and machine.vram is not None:
        named = [plan for plan in plans if plan.memory == memory]
        fitting = [plan for plan in named if plan.fits]
        if fitting:
            return replace(fitting[0], why=f"generation.memory is {memory}; {fitting[0].why}")
        if named:
            leanest = min(named, key=lambda plan: plan.vram)
            return replace(leanest, why=f"generation.memory is {memory}, which may not fit: {leanest.why}")
    fitting = [plan for plan in plans if plan.fits]
    if not fitting:
        raise NoPlanFits(_nothing_fits(footprint, size, machine, plans))
    chosen = fitting[0]
    if leaner_than is not None:
        return replace(chosen, why=f"the GPU ran out of memory with {leaner_than.memory}; {chosen.why}")
    return chosen


def tiling_allows(plan: Plan, vae_tiling: str) -> bool:
    """Whether generation.vae_tiling ("auto", "on", "off") lets `plan` decode as it does."""
    return vae_tiling == "auto" or plan.vae_tiled == (vae_tiling == "on")


def _nothing_fits(footprint: Footprint, size: JobSize, machine: Machine, plans: list[Plan]) -> str:
    vram = machine.vram or 0
    gpu_plans = [plan for plan in plans if plan.vram <= vram - margin(vram)]
    if not gpu_plans:
        least = min(plans, key=lambda plan: plan.vram) if plans else None
        need = (least.vram + margin(vram)) / GIB if least else 0.0
        return (
            f"A {size.describe()} video needs at least {need:.1f} GiB of GPU memory even streaming the model "
            f"layer by layer; this GPU offers {vram / GIB:.1f} GiB."
        )
    least_ram = min(gpu_plans, key=lambda plan: plan.ram)
    return (
        f"A {size.describe()} video needs {least_ram.ram / GIB:.0f} GiB of host memory for the model's parts that "
        f"wait off the GPU ({least_ram.memory}); this machine has {machine.ram / GIB:.0f} GiB available."
    )


# -- the plans ---------------------------------------------------------------------------------------------------


def _phases(
    footprint: Footprint, size: JobSize, tiled: bool, encode: int, denoise: int, decode: int
) -> tuple[tuple[str, int], ...]:
    """Peak GPU memory while encoding the prompt, denoising and decoding, from the bytes each phase holds resident."""
    measured = footprint.measured
    activations = _activations(footprint, size)
    output = size.pixel_frames * 3 * 4  # the decoded video in fp32
    work = measured.decode_bytes_per_pixel * size.width * size.height * footprint.decode_share
    decoding = int(min(measured.tiled_decode_bytes, work) if tiled else work) + output
    return (
        ("encode", int(RUNTIME_BYTES + encode + TEXT_ACTIVATIONS)),
        ("denoise", RUNTIME_BYTES + denoise + activations),
        ("decode", RUNTIME_BYTES + decode + decoding),
    )


def _activations(footprint: Footprint, size: JobSize) -> int:
    return int(footprint.measured.denoise_bytes_per_token * footprint.tokens(size.width, size.height, size.frames))


def _plan(
    footprint: Footprint,
    size: JobSize,
    memory: str,
    where: tuple[Where, Where],
    tiled: bool,
    phases: tuple[tuple[str, int], ...],
    ram: int,
    seconds: float,
    why: str,
) -> Plan:
    tiling = "; the VAE decodes in tiles (less memory, slower)" if tiled else ""
    vram = max(peak for _, peak in phases)
    activations = _activations(footprint, size)
    return Plan(memory, *where, tiled, vram, ram, seconds, why + tiling, phases=phases, activations=activations)


def _compute_s(footprint: Footprint, size: JobSize, machine: Machine, fp8: bool = False) -> float:
    tokens = footprint.tokens(size.width, size.height, size.frames)
    flops_per_s = machine.peak_tflops * 1e12 * footprint.measured.mfu * (FP8_SPEEDUP if fp8 else 1.0)
    return size.passes * footprint.pass_flops(tokens) / flops_per_s


def _decode_s(footprint: Footprint, size: JobSize, tiled: bool) -> float:
    measured = footprint.measured
    if tiled:
        return (measured.tiled_decode_s_per_pixel_frame + ENCODE_S_PER_PIXEL_FRAME) * size.pixel_frames
    return measured.decode_s_per_pixel_frame * size.pixel_frames


def _gpu(footprint: Footprint, size: JobSize, machine: Machine, tiled: bool, text_stays: bool) -> Plan:
    fp8 = machine.fp8
    weights = int(sum(footprint.experts) * (FP8_SHARE if fp8 else 1.0)) + footprint.vae
    text = footprint.text_encoder
    if text_stays:
        phases = _phases(footprint, size, tiled, text + weights, text + weights, text + weights)
        text_s, ram = TEXT_ENCODE_S, HOST_BASE
    else:
        phases = _phases(footprint, size, tiled, text + weights, weights, weights)
        text_s, ram = TEXT_ENCODE_S + text / PINNED_BYTES_PER_S, HOST_BASE + text
    if fp8:
        # Each expert comes onto the GPU in bf16 (a LoRA is fused into it there) before it is quantized.
        largest = footprint.largest_expert
        rest = int((sum(footprint.experts) - largest) * FP8_SHARE)
        loading = (text if text_stays else 0) + footprint.vae + largest + rest + RUNTIME_BYTES
        phases = (*phases, ("load", loading))
    seconds = text_s + _compute_s(footprint, size, machine, fp8) + _decode_s(footprint, size, tiled)
    why = "the whole model fits on the GPU"
    if not text_stays:
        why += ", the text encoder only while it encodes"
    if fp8:
        why += "; the transformers in fp8 (generation.fp8), half their bf16 size"
    where = (Where.GPU if text_stays else Where.SWAPPED, Where.GPU_FP8 if fp8 else Where.GPU)
    return _plan(footprint, size, "gpu", where, tiled, phases, ram, seconds, why)


def _model_offload(footprint: Footprint, size: JobSize, machine: Machine, tiled: bool) -> Plan:
    vae, text, largest = footprint.vae, footprint.text_encoder, footprint.largest_expert
    # Each part comes in when it runs and the others make room: the expert a job ends with is not the one the next
    # begins with, so leaving nothing on the GPU between phases costs no extra copy (for one transformer, one copy).
    phases = _phases(footprint, size, tiled, vae + text, vae + largest, vae)
    ram = HOST_BASE + text + sum(footprint.experts)
    # Per video each part comes in once; the first blocks compute while the rest copy, so about one copy each.
    swaps_s = (text + sum(footprint.experts)) / PINNED_BYTES_PER_S
    seconds = TEXT_ENCODE_S + swaps_s + _compute_s(footprint, size, machine) + _decode_s(footprint, size, tiled)
    if len(footprint.experts) > 1:
        why = "one transformer on the GPU at a time, the other waiting in pinned host memory (a swap is one copy)"
    else:
        why = "each part on the GPU only while it runs, waiting in pinned host memory otherwise (one copy each)"
    return _plan(footprint, size, "model_offload", (Where.SWAPPED, Where.SWAPPED), tiled, phases, ram, seconds, why)


def _group_offload(footprint: Footprint, size: JobSize, machine: Machine, tiled: bool) -> Plan:
    window = 3 * footprint.largest_expert // footprint.layers  # the running block, the next one, one in flight
    text_window = footprint.text_encoder  # diffusers streams UMT5 as one group: it has no list of blocks to split
    phases = _phases(footprint, size, tiled, footprint.vae + text_window, footprint.vae + window, footprint.vae)
    ram = HOST_BASE + footprint.text_encoder + sum(footprint.experts)
    tokens = footprint.tokens(size.width, size.height, size.frames)
    flops_per_s = machine.peak_tflops * 1e12 * footprint.measured.mfu
    pass_s = max(footprint.pass_flops(tokens) / flops_per_s, footprint.largest_expert / PINNED_BYTES_PER_S)
    pass_s += HOOK_S * footprint.layers
    text_s = TEXT_ENCODE_S + footprint.text_encoder / PINNED_BYTES_PER_S
    seconds = text_s + STREAM_OVERHEAD * size.passes * pass_s + _decode_s(footprint, size, tiled)
    why = "the model does not fit: its blocks stream from pinned host memory, copies overlapped with compute"
    return _plan(footprint, size, "group_offload", (Where.STREAMED, Where.STREAMED), tiled, phases, ram, seconds, why)


def _sequential(footprint: Footprint, size: JobSize, machine: Machine, tiled: bool) -> Plan:
    layer = footprint.largest_expert // (footprint.layers * 8)  # about the largest linear layer of a block
    phases = _phases(footprint, size, tiled, footprint.vae + layer, footprint.vae + layer, footprint.vae)
    ram = HOST_BASE + footprint.text_encoder + sum(footprint.experts)
    copy_s = footprint.largest_expert / LEAF_BYTES_PER_S + HOOK_S * footprint.layers * 8
    seconds = (
        TEXT_ENCODE_S + size.passes * copy_s + _compute_s(footprint, size, machine) + _decode_s(footprint, size, tiled)
    )
    why = "not even a block fits beside the activations: the model streams a layer at a time (slow)"
    return _plan(footprint, size, "sequential_offload", (Where.LAYERS, Where.LAYERS), tiled, phases, ram, seconds, why)
