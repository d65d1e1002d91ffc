"""A plan (engine/pipeline/planner.py) put into effect on a loaded pipeline.

`gpu` and `model_offload` are wanbot's own: resident parts move to the GPU once; swapped parts keep their master
copy in pinned host memory and come onto the GPU when they run, copied on a side stream one block at a time, so
the first blocks compute while the rest are still on their way. Leaving the GPU costs nothing: the master copy is
still there, the GPU copy is dropped. A part that runs makes the other swapped parts leave first, and the decode
makes all of them leave. Near the end of one expert's steps the next expert's first blocks are prefetched into
the room the plan leaves. `group_offload` and `sequential_offload` are diffusers' hooks (with CUDA streams for
group offload).

The streams sit behind `Copier`: on a CPU it copies synchronously, so the tests run every swap, prefetch and
eviction with CPU tensors standing in for the GPU's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.pipeline.planner import Plan, Where

log = logging.getLogger(__name__)

EXPERTS = ("transformer", "transformer_2")
SLAB_BYTES = 2**30  # the host buffers swapped parts are packed into
ALIGN_BYTES = 512


class Copier:
    """Host-to-device copies: on a side CUDA stream from pinned memory, or plain copies where there is no CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None

    def pin_in_place(self, tensors: list[torch.Tensor], slab_bytes: int = SLAB_BYTES) -> None:
        """Move each of `tensors` (parameters and buffers, by `.data`) into host memory packed into a few large
        buffers, pinned where there is CUDA; each leaves its old storage as soon as it is copied, so host memory
        holds one buffer more at most. Packed, because torch's pinned allocator rounds every allocation up to a
        power of two: tensor by tensor an A14B expert's 26.6 GiB would take 40.7 GiB."""
        sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
        slab = max(slab_bytes, _power_of_two(max(sizes, default=1)))
        used: list[int] = []  # bytes filled in each buffer
        contents: list[list[tuple[int, int]]] = []  # per buffer: (tensor index, offset)
        for index in sorted(range(len(tensors)), key=lambda index: -sizes[index]):  # first fit, largest first
            for buffer, filled in enumerate(used):
                start = -(-filled // ALIGN_BYTES) * ALIGN_BYTES
                if start + sizes[index] <= slab:
                    contents[buffer].append((index, start))
                    used[buffer] = start + sizes[index]
                    break
            else:
                contents.append([(index, 0)])
                used.append(sizes[index])
        for filled, placed in zip(used, contents, strict=True):
            memory = torch.empty(_power_of_two(max(filled, ALIGN_BYTES)), dtype=torch.uint8, pin_memory=self.cuda)
            for index, offset in placed:
                tensor = tensors[index]
                view = memory[offset : offset + sizes[index]].view(tensor.dtype).view(tensor.shape)
                tensor.data = view.copy_(tensor.data)

    def copy_in(self, masters: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Device copies of `masters` and an event the compute stream waits on before using them."""
        if self._stream is None:
            return [master.clone() for master in masters], None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the room was freed on the compute stream
        with torch.cuda.stream(self._stream):
            copies = [master.to(self.device, non_blocking=True) for master in masters]
            event = torch.cuda.Event()
            event.record(self._stream)
        return copies, event

    def wait(self, copies: list[torch.Tensor], event: Any) -> None:
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for copy in copies:
            copy.record_stream(compute)  # freed on eviction only once the compute stream is done with it


@dataclass
class Chunk:
    """Tensors that come onto the GPU together: one block of a transformer, or the rest of a part."""

    tensors: list[torch.Tensor]  # the parameters and buffers themselves; their `.data` is swapped
    masters: list[torch.Tensor] = field(default_factory=list)  # the host copies, pinned
    copies: list[torch.Tensor] = field(default_factory=list)  # on the GPU while loaded
    event: Any = None  # pending copy
    loaded: bool = False

    @property
    def bytes(self) -> int:
        return sum(master.numel() * master.element_size() for master in self.masters)


@dataclass
class Part:
    name: str
    module: torch.nn.Module
    chunks: list[Chunk]  # the rest first, then the blocks in the order they run

    @property
    def bytes(self) -> int:
        return sum(chunk.bytes for chunk in self.chunks)

    @property
    def loaded_bytes(self) -> int:
        return sum(chunk.bytes for chunk in self.chunks if chunk.loaded)


class Placement:
    """Where each part of one loaded pipeline is, and the hooks that move swapped parts in and out."""

    def __init__(
        self,
        pipeline: Any,
        plan: Plan,
        device: torch.device,
        budget: int | None = None,
        per_block: bool = True,
        quantize: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        """`budget`: GPU bytes the plan may fill; prefetching stays within it. `per_block`: each block waits for its
        own copy; compiled blocks cannot run a hook, so without it a part waits for all its blocks at once.
        `quantize`: how an fp8 plan's experts become fp8, once on the GPU (after a LoRA is fused into them)."""
        self._quantize = quantize
        self._unquantized: set[str] = set()
        self.plan = plan
        self._pipeline = pipeline
        self._device = device
        self._copier = Copier(device)
        self._budget = budget
        self._parts: dict[str, Part] = {}
        self._handles: list[Any] = []
        self._per_block = per_block
        self._coming: str | None = None  # the part whose first blocks are being prefetched
        self.copied_bytes = 0  # what swaps moved onto the device, for the tests and the log
        self.peak_loaded = 0  # most swapped bytes on the device at once
        if plan.memory == "group_offload":
            pipeline.enable_group_offload(
                onload_device=device,
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=self._copier.cuda,
                record_stream=self._copier.cuda,
            )
        elif plan.memory == "sequential_offload":
            pipeline.enable_sequential_cpu_offload(device=device)
        elif plan.memory == "cpu":
            pipeline.to(device)
        else:
            self._place_own(pipeline)

    # -- wanbot's own placement -----------------------------------------------------------------------------------

    def _place_own(self, pipeline: Any) -> None:
        swapped = self._swapped_names(pipeline)
        for name, module in _components(pipeline):
            if name in swapped:
                module.to("cpu")
                self._parts[name] = self._swappable(name, module)
            elif name in EXPERTS and self.plan.fp8:
                self._unquantized.add(name)  # placed by `editing` or `settle`, one at a time, quantized there
            else:
                module.to(self._device)
        if self._parts and getattr(pipeline, "vae", None) is not None:
            self._handles.append(pipeline.vae.decoder.register_forward_pre_hook(self._before_decode))
        if "text_encoder" in self._parts:
            # Where the experts stay, nothing else swapped comes in to push the text encoder out: they do it.
            for name in EXPERTS:
                resident = getattr(pipeline, name, None)
                if resident is not None and name not in self._parts:
                    hook = resident.register_forward_pre_hook(lambda _m, _a: self._evict(self._parts["text_encoder"]))
                    self._handles.append(hook)

    def _swapped_names(self, pipeline: Any) -> set[str]:
        names: set[str] = set()
        if self.plan.text_encoder is Where.SWAPPED:
            names.add("text_encoder")
        if self.plan.experts is Where.SWAPPED:
            names.update(name for name in EXPERTS if getattr(pipeline, name, None) is not None)
        return names

    def _swappable(self, name: str, module: torch.nn.Module) -> Part:
        blocks = list(getattr(module, "blocks", []))
        in_blocks = {id(tensor) for block in blocks for tensor in _tensors(block)}
        rest = Chunk([tensor for tensor in _tensors(module) if id(tensor) not in in_blocks])
        chunks = [rest] + [Chunk(list(_tensors(block))) for block in blocks]
        part = Part(name, module, chunks)
        self._pin(part)
        self._handles.append(module.register_forward_pre_hook(lambda _module, _args: self.bring(name)))
        for chunk, block in zip(chunks[1:], blocks, strict=True) if self._per_block else ():
            hook = block.register_forward_pre_hook(lambda _module, _args, chunk=chunk: self._ready(chunk))
            self._handles.append(hook)
        return part

    def _pin(self, part: Part) -> None:
        """Make each tensor's host copy, packed and pinned, its master."""
        self._copier.pin_in_place([tensor for chunk in part.chunks for tensor in chunk.tensors])
        for chunk in part.chunks:
            chunk.masters = [tensor.data for tensor in chunk.tensors]

    def bring(self, name: str) -> None:
        """Put part `name` on the GPU, making the other swapped parts leave first (but for the blocks prefetched
        for the part that runs next)."""
        part = self._parts[name]
        if self._coming == name:
            self._coming = None
        for other in self._parts.values():
            if other is not part and other.name != self._coming:
                self._evict(other)
        self._load(part, part.chunks)
        for chunk in part.chunks if not self._per_block else part.chunks[:1]:
            self._ready(chunk)

    def prefetch(self, name: str, room: int) -> int:
        """Start copying the first chunks of `name` that fit in `room` bytes; how many bytes were started."""
        part = self._parts.get(name)
        if part is None:
            return 0
        self._coming = name
        chosen: list[Chunk] = []
        for chunk in part.chunks:
            if chunk.loaded:
                continue
            if chunk.bytes > room:
                break
            chosen.append(chunk)
            room -= chunk.bytes
        self._load(part, chosen)
        return sum(chunk.bytes for chunk in chosen)

    def _load(self, part: Part, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            if chunk.loaded:
                continue
            chunk.copies, chunk.event = self._copier.copy_in(chunk.masters)
            for tensor, copy in zip(chunk.tensors, chunk.copies, strict=True):
                tensor.data = copy
            chunk.loaded = True
            self.copied_bytes += chunk.bytes
        self.peak_loaded = max(self.peak_loaded, self.loaded_bytes)

    def _ready(self, chunk: Chunk) -> None:
        if chunk.event is not None:
            self._copier.wait(chunk.copies, chunk.event)
            chunk.event = None

    def _evict(self, part: Part) -> None:
        for chunk in part.chunks:
            if not chunk.loaded:
                continue
            self._ready(chunk)  # a prefetch still in flight must land before its memory is given back
            for tensor, master in zip(chunk.tensors, chunk.masters, strict=True):
                tensor.data = master
            chunk.copies, chunk.loaded = [], False

    def _before_decode(self, _module: Any, _args: Any) -> None:
        self.evict_all()

    def evict_all(self) -> None:
        self._coming = None
        for part in self._parts.values():
            self._evict(part)

    @property
    def loaded_bytes(self) -> int:
        return sum(part.loaded_bytes for part in self._parts.values())

    def is_loaded(self, name: str) -> bool:
        part = self._parts.get(name)
        return part is not None and all(chunk.loaded for chunk in part.chunks)

    # -- what the runner tells it ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def editing(self, name: str) -> Iterator[None]:
        """Change part `name`'s weights in place (fuse a LoRA, put originals back) where they compute: a swapped
        part comes onto the GPU for it, and its pinned masters take the result afterwards."""
        if name in self._unquantized:
            getattr(self._pipeline, name).to(self._device)  # in bf16 while it changes, then quantized
            yield
            self._settle_one(name)
            return
        part = self._parts.get(name)
        if part is None:
            yield
            return
        self.bring(name)
        for chunk in part.chunks:  # no block's hook runs while weights change: every copy must have landed
            self._ready(chunk)
        try:
            yield
        finally:
            self._commit(part)

    def settle(self) -> None:
        """Put the experts an fp8 plan keeps on the GPU there, quantized one after the other: both in bf16 at once
        would need the memory the plan saves."""
        for name in EXPERTS:
            if name in self._unquantized:
                self._settle_one(name)

    def _settle_one(self, name: str) -> None:
        module = getattr(self._pipeline, name)
        module.to(self._device)
        if self._quantize is not None:
            self._quantize(module)
        self._unquantized.discard(name)

    def _commit(self, part: Part) -> None:
        with torch.no_grad():
            for chunk in part.chunks:
                self._ready(chunk)
                for index, (tensor, master) in enumerate(zip(chunk.tensors, chunk.masters, strict=True)):
                    master.copy_(tensor.data)  # peft's fuse may have given the tensor new storage
                    chunk.copies[index] = tensor.data

    def on_step_end(self, step: int, experts: list[str], activations: int) -> None:
        """After step `step` of a run whose steps use `experts` in order: when the next step is the last of its
        expert, start the following expert's first blocks in the room the budget leaves beside `activations`."""
        after_next = step + 2
        if self._budget is None or after_next >= len(experts) or experts[after_next] == experts[step + 1]:
            return
        coming = experts[after_next]
        if coming not in self._parts:
            return
        resident = sum(part.bytes for part in self._parts.values() if self.is_loaded(part.name))
        room = self._budget - resident - activations - self._fixed_bytes()
        try:
            started = self.prefetch(coming, room) if room > 0 else 0
        except torch.OutOfMemoryError:
            # The activations took more than their estimate: prefetching is a gain, never worth the job.
            log.warning("no room to prefetch %s; it comes in when it runs", coming)
            self._evict(self._parts[coming])
            self._coming = None
            return
        if started:
            log.debug("prefetching %.1f GiB of %s", started / 2**30, coming)

    def _fixed_bytes(self) -> int:
        """The parts that stay on the GPU (the VAE, and in the gpu plan the experts)."""
        return sum(_module_bytes(module) for name, module in _components(self._pipeline) if name not in self._parts)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def expert_order(pipeline: Any, boundary_ratio: float | None) -> list[str]:
    """Which transformer each of the run's steps uses, read from the scheduler's timesteps."""
    timesteps = [float(step) for step in pipeline.scheduler.timesteps]
    if boundary_ratio is None or getattr(pipeline, "transformer_2", None) is None:
        return ["transformer"] * len(timesteps)
    boundary = boundary_ratio * pipeline.scheduler.config.num_train_timesteps
    return ["transformer" if step >= boundary else "transformer_2" for step in timesteps]


def _components(pipeline: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    for name in ("text_encoder", *EXPERTS, "vae", "image_encoder"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            yield name, module


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _power_of_two(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in _tensors(module))
