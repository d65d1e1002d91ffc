"""What a style LoRA (`lora=NAME[:WEIGHT]`, issue 25 item 3) costs per transformer pass, on this machine.

Style LoRAs are never fused (engine/pipeline/styles.py): peft wraps each adapted linear layer and, while an adapter
is active, adds its two thin matmuls (down to rank r, up again, times weight x alpha / r) to every pass. This times
one forward pass of a Wan transformer (diffusers' WanTransformer3DModel, random weights) larger than the tiny test
model, through the real code path: random LoRAs in the ComfyUI layout style LoRAs are shared in (`random_style_lora`,
lora_A/lora_B on each block's ten linear layers), written with `write_lora`, loaded and switched by wanbot's own
StyleAdapters (`pipeline.load_lora_weights(path, adapter_name=...)`, `set_adapters` at the job's weights,
`disable_adapters` for a job without LoRAs) on a WanPipeline that holds just this transformer.

Four copies of the same random weights, so that the states can be interleaved pass by pass (on a shared machine
the load of other processes comes and goes in seconds):

- `none`: a plain copy (no adapter ever loaded, plain linear layers), and `none, a second copy`, the same again: the
  noise floor;
- a copy holding one adapter of rank --rank: `one active` at --weight, and `one loaded, off` (disabled, as for a job
  without LoRAs after one with it);
- a copy holding two: `two active`, both at --weight, and `two loaded, off` (generation.lora_cache holding two).

A state is switched to with StyleAdapters.apply() (untimed) before each of its passes. After --warmup untimed passes
of every state, --passes cycles each run one timed pass of every state, in an order rotated every cycle. Figures:
median and p90 of a pass, the overhead of the medians against `none`, and the median over cycles of each pass against
the `none` pass of its own cycle (steadier when the load drifts); loading an adapter (apply() of a job naming it: the
file read, converted and injected; seconds, and the file's MB); switching a loaded adapter on; and the largest
difference between the output of `none` and of every inactive state (peft adds nothing: 0). Also printed: the share
of the blocks' FLOPs an adapter adds, counted from the layer shapes, for this model and for A14B at 480p.

Default size (a pass of about 0.3 s on 2 cores in bf16): 8 blocks, 12 heads x 64 = 768 wide, ffn 3072, text_dim
4096 with 512 text tokens, latent 16 x 4 x 16 x 32 (patches 1x2x2: 512 video tokens), bf16 with Wan's fp32 modules
kept in fp32 as from_pretrained does. On the CPU by default; `--device cuda` runs the same on a GPU (each pass
timed between torch.cuda.synchronize() calls), at this width, far below A14B's 5120: a GPU figure for the real
model needs its shapes.

    .venv/bin/python -m bench.style_loras [--passes 10] [--warmup 2] [--threads 2] [--rank 32]
        [--weight 0.8] [--blocks 8] [--latent 4x16x32] [--dtype bf16|fp32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanPipeline, WanTransformer3DModel

from engine.jobs import LoraUse
from engine.pipeline.loras import BLOCK_LINEARS, random_style_lora, write_lora
from engine.pipeline.styles import StyleAdapters, StyleFiles

HEADS, HEAD_DIM, FFN, TEXT_DIM, TEXT_TOKENS, CHANNELS = 12, 64, 3072, 4096, 512, 16
STATES = ("none", "one active", "one loaded, off", "two active", "two loaded, off", "none, a second copy")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """A Wan transformer's sizes, enough to count the FLOPs of its blocks."""

    name: str
    width: int
    ffn: int
    blocks: int
    tokens: int
    text_tokens: int


# T2V-A14B (each expert) at 832x480x81: latent 21 x 60 x 104, patches 1x2x2.
A14B_480P = Shape("A14B, 832x480x81", 5120, 13824, 40, 21 * 30 * 52, 512)


def block_flops(shape: Shape, rank: int) -> tuple[float, float]:
    """FLOPs of one block's pass (linear layers + attention scores) and what a rank-`rank` adapter on its ten linear
    layers adds (2 * r * (in + out) a token each); norms, modulation, embedders and the head are left out."""
    width, ffn, tokens, text = shape.width, shape.ffn, shape.tokens, shape.text_tokens
    # (in, out, tokens it runs on): attn1 q k v o, attn2 q o on the video tokens, attn2 k v on the text, the ffn.
    layers = [(width, width, tokens)] * 6 + [(width, width, text)] * 2 + [(width, ffn, tokens), (ffn, width, tokens)]
    linear = sum(2 * fan_in * fan_out * count for fan_in, fan_out, count in layers)
    attention = 4 * tokens * tokens * width + 4 * tokens * text * width  # QK^T and AV, self then cross
    lora = sum(2 * rank * (fan_in + fan_out) * count for fan_in, fan_out, count in layers)
    return linear + attention, lora


def build(blocks: int, dtype: torch.dtype, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=FFN,
        num_layers=blocks,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ).eval()
    # As from_pretrained(torch_dtype=...) does: the modules Wan keeps in fp32 stay so, the rest is cast.
    keep = transformer._keep_in_fp32_modules or []
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if not any(part in name.split(".") for part in keep):
                parameter.data = parameter.data.to(dtype)
    return transformer


def style(folder: Path, name: str, transformer: WanTransformer3DModel, rank: int, weight: float) -> StyleFiles:
    """A random style LoRA for `transformer` on disk, as a job names it."""
    generator = torch.Generator().manual_seed(len(name))
    # A small std keeps the adapted model's activations in range (the seconds do not depend on the values).
    path = write_lora(random_style_lora(transformer, rank, generator, std=0.02), folder / f"{name}.safetensors")
    return StyleFiles(LoraUse(name=name, weight=weight, repo=str(folder), files=[path.name]), (path,))


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(work: Callable[[], object]) -> float:
    synchronize()
    started = time.perf_counter()
    work()
    synchronize()
    return time.perf_counter() - started


def p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=10, help="timed passes per state (cycles through the states)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per state before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--weight", type=float, default=0.8, help="each active adapter's weight")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--latent", default="4x16x32", help="latent frames x height x width (patches 1x2x2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    frames, height, width = (int(part) for part in args.latent.split("x"))
    tokens = frames * (height // 2) * (width // 2)

    started = time.perf_counter()
    plain = build(args.blocks, dtype, args.seed).to(device)
    build_s = time.perf_counter() - started
    parameters = sum(parameter.numel() for parameter in plain.parameters())
    generator = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(1, CHANNELS, frames, height, width, generator=generator).to(device, dtype)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator).to(device, dtype)
    timestep = torch.tensor([500], device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"the CPU ({os.cpu_count()} cores)"
    print(
        f"WanTransformer3DModel, random: {args.blocks} blocks, {HEADS} heads x {HEAD_DIM} = {HEADS * HEAD_DIM} wide, "
        f"ffn {FFN}, text_dim {TEXT_DIM} x {TEXT_TOKENS} text tokens, latent {CHANNELS}x{args.latent} "
        f"({tokens} video tokens), {args.dtype}, {parameters / 1e6:.0f} M parameters (built in {build_s:.1f} s)"
    )
    print(
        f"torch {torch.__version__} on {where}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}; "
        f"{args.warmup} warm-up + {args.passes} timed passes per state; adapters of rank {args.rank} at weight "
        f"{args.weight}"
    )

    loads: list[float] = []
    switches: list[float] = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        first = style(Path(folder), "first", plain, args.rank, args.weight)
        second = style(Path(folder), "second", plain, args.rank, args.weight)
        megabytes = first.paths[0].stat().st_size / 1e6

        def holding(styles: list[StyleFiles]) -> tuple[WanTransformer3DModel, StyleAdapters]:
            transformer = copy.deepcopy(plain)
            pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)
            adapters = StyleAdapters(pipeline, device, cache_size=len(styles))
            for count in range(1, len(styles) + 1):
                loads.append(seconds(lambda count=count: adapters.apply(styles[:count])))  # a job naming one more
            adapters.apply([])
            switches.append(seconds(lambda: adapters.apply(styles)))  # a job naming cached adapters
            return transformer, adapters

        one, one_adapters = holding([first])
        two, two_adapters = holding([first, second])
        adapter_dtypes = {str(parameter.dtype) for name, parameter in two.named_parameters() if ".lora_" in name}
        states: dict[str, tuple[WanTransformer3DModel, Callable[[], None]]] = {
            "none": (plain, lambda: None),
            "one active": (one, lambda: one_adapters.apply([first])),
            "one loaded, off": (one, lambda: one_adapters.apply([])),
            "two active": (two, lambda: two_adapters.apply([first, second])),
            "two loaded, off": (two, lambda: two_adapters.apply([])),
            "none, a second copy": (copy.deepcopy(plain), lambda: None),
        }

        def forward(state: str) -> torch.Tensor:
            transformer, _ = states[state]
            return transformer(latents, timestep, text, return_dict=False)[0]

        reference = forward("none")
        differences: dict[str, float] = {}
        for state, (_, switch) in states.items():
            switch()
            for _ in range(args.warmup):
                output = forward(state)
            if "active" not in state:
                differences[state] = (output.float() - reference.float()).abs().max().item()
        times: dict[str, list[float]] = {state: [] for state in STATES}
        ratios: dict[str, list[float]] = {state: [] for state in STATES}
        for cycle in range(args.passes):
            order = STATES[cycle % len(STATES) :] + STATES[: cycle % len(STATES)]
            for state in order:
                states[state][1]()
                times[state].append(seconds(lambda state=state: forward(state)))
            for state in STATES:
                ratios[state].append(times[state][-1] / times["none"][-1])

    base = statistics.median(times["none"])
    print()
    print("| state | median s/pass | p90 s/pass | overhead: medians | overhead: median of per-cycle ratios |")
    print("|---|---|---|---|---|")
    for state in STATES:
        median = statistics.median(times[state])
        print(
            f"| {state} | {median:.4f} | {p90(times[state]):.4f} | {(median / base - 1) * 100:+.1f}% | "
            f"{(statistics.median(ratios[state]) - 1) * 100:+.1f}% |"
        )
    print()
    each = ", ".join(f"{load:.3f}" for load in loads)
    print(
        f"load one adapter (apply() of a job naming it: read, convert, inject): median "
        f"{statistics.median(loads):.3f} s of {len(loads)} ({each}); file {megabytes:.1f} MB (fp32, rank "
        f"{args.rank}); adapter weights in the model: {', '.join(sorted(adapter_dtypes))}"
    )
    print(f"switch loaded adapters on (apply()): {', '.join(f'{switch * 1000:.1f} ms' for switch in switches)}")
    print(
        "largest |difference| from the plain model's output: "
        + ", ".join(f"{state} {value:.3g}" for state, value in differences.items())
    )
    ours = Shape("this model", HEADS * HEAD_DIM, FFN, args.blocks, tokens, TEXT_TOKENS)
    for shape in (ours, A14B_480P):
        total, lora = block_flops(shape, args.rank)
        per_block = sum(args.rank * (fan_in + fan_out) for fan_in, fan_out in _layer_shapes(shape))
        print(
            f"FLOPs one adapter of rank {args.rank} adds to the blocks, {shape.name} ({shape.tokens} tokens): "
            f"{lora / total * 100:.2f}% ({per_block * shape.blocks / 1e6:.0f} M adapter parameters, "
            f"{per_block * shape.blocks * 2 / 1e6:.0f} MB in bf16)"
        )
    print(f"load average {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f} s")


def _layer_shapes(shape: Shape) -> list[tuple[int, int]]:
    """(in, out) of the ten linear layers of a block a style LoRA adapts (BLOCK_LINEARS)."""
    width, ffn = shape.width, shape.ffn
    shapes = [(width, width)] * 8 + [(width, ffn), (ffn, width)]
    assert len(shapes) == len(BLOCK_LINEARS)
    return shapes


if __name__ == "__main__":
    main()
