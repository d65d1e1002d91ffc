"""What a style LoRA (`lora=NAME[:WEIGHT]`, issue 25 item 3) costs per transformer pass, on this machine's CPU.

Style LoRAs are never fused (engine/pipeline/styles.py): peft wraps each adapted linear layer and, while an adapter
is active, adds its two thin matmuls (down to rank r, up again, times weight x alpha / r) to every pass. This times
one forward pass of a Wan transformer (diffusers' WanTransformer3DModel, random weights) larger than the tiny test
model, through the real code path: random LoRAs in the ComfyUI layout style LoRAs are shared in (`random_style_lora`,
lora_A/lora_B on each block's ten linear layers), written with `write_lora`, loaded and switched by wanbot's own
StyleAdapters (`pipeline.load_lora_weights(path, adapter_name=...)`, `set_adapters` at the job's weights,
`disable_adapters` for a job without LoRAs) on a WanPipeline that holds just this transformer.

Per round, in this order, each state with --warmup untimed passes then --passes timed ones:

1. `none`: no adapter loaded (plain linear layers);
2. `one active`: one adapter of rank --rank loaded (the load timed: apply() of a job naming it) and active at
   --weight;
3. `one loaded, off`: the same adapter kept loaded but inactive (a job without LoRAs after one with it);
4. `two active`: a second adapter loaded, both active at --weight;
5. `two loaded, off`: both kept loaded, inactive (generation.lora_cache holding two);
6. `none again`: every adapter dropped (`drop_all`), the same plain model as in 1: the noise floor.

Every round starts from plain layers again, so the rounds interleave the states. Figures: median and p90 of a pass
over all rounds, its overhead against `none`, the load (seconds, the file's MB), switching a loaded adapter on, and
the largest difference between the outputs of `none` and of the inactive states (peft adds nothing: 0). Also printed:
the share of the blocks' FLOPs the adapters add, counted from the layer shapes, for this model and for A14B.

Default size (a pass of about 0.3 s on 2 cores in bf16): 8 blocks, 12 heads x 64 = 768 wide, ffn 3072, text_dim
4096 with 512 text tokens, latent 16 x 4 x 16 x 32 (patches 1x2x2: 512 video tokens), bf16 with Wan's fp32 modules
kept in fp32 as from_pretrained does. The seconds are this CPU's; a GPU's overhead is another figure.

    .venv/bin/python -m bench.style_loras [--passes 10] [--warmup 2] [--rounds 2] [--threads 2] [--rank 32]
        [--weight 0.8] [--blocks 8] [--latent 4x16x32] [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
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
STATES = ("none", "one active", "one loaded, off", "two active", "two loaded, off", "none again")
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


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=10, help="timed passes per state and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes before each state's timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="rounds through every state, interleaving them")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--weight", type=float, default=0.8, help="each active adapter's weight")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--latent", default="4x16x32", help="latent frames x height x width (patches 1x2x2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    frames, height, width = (int(part) for part in args.latent.split("x"))
    tokens = frames * (height // 2) * (width // 2)

    started = time.perf_counter()
    build_started = time.perf_counter()
    transformer = build(args.blocks, dtype, args.seed)
    build_s = time.perf_counter() - build_started
    parameters = sum(parameter.numel() for parameter in transformer.parameters())
    pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)
    adapters = StyleAdapters(pipeline, torch.device("cpu"), cache_size=2)

    generator = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(1, CHANNELS, frames, height, width, generator=generator).to(dtype)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator).to(dtype)
    timestep = torch.tensor([500])

    def forward() -> torch.Tensor:
        return transformer(latents, timestep, text, return_dict=False)[0]

    print(
        f"WanTransformer3DModel, random: {args.blocks} blocks, {HEADS} heads x {HEAD_DIM} = {HEADS * HEAD_DIM} wide, "
        f"ffn {FFN}, text_dim {TEXT_DIM} x {TEXT_TOKENS} text tokens, latent {CHANNELS}x{args.latent} "
        f"({tokens} video tokens), {args.dtype}, {parameters / 1e6:.0f} M parameters (built in {build_s:.1f} s)"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} rounds x ({args.warmup} warm-up "
        f"+ {args.passes} timed passes) per state; adapters of rank {args.rank} at weight {args.weight}"
    )

    times: dict[str, list[float]] = {state: [] for state in STATES}
    loads: list[float] = []
    switches: list[float] = []
    differences: dict[str, float] = {}
    megabytes = 0.0
    adapter_dtypes: set[str] = set()
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        first = style(Path(folder), "first", transformer, args.rank, args.weight)
        second = style(Path(folder), "second", transformer, args.rank, args.weight)
        megabytes = first.paths[0].stat().st_size / 1e6
        reference = forward()
        for _ in range(args.rounds):
            for state in STATES:
                if state == "one active":
                    loads.append(seconds(lambda: adapters.apply([first])))
                    adapter_dtypes |= {
                        str(parameter.dtype) for name, parameter in transformer.named_parameters() if ".lora_" in name
                    }
                elif state == "one loaded, off":
                    adapters.apply([])
                elif state == "two active":
                    adapters.apply([first])  # the job before, so that the switch below is a load
                    adapters.apply([first, second])
                elif state == "two loaded, off":
                    adapters.apply([])
                    switches.append(seconds(lambda: adapters.apply([first])))  # a job naming a cached adapter
                    adapters.apply([])
                elif state == "none again":
                    adapters.drop_all()
                for _ in range(args.warmup):
                    forward()
                for _ in range(args.passes):
                    pass_started = time.perf_counter()
                    output = forward()
                    times[state].append(time.perf_counter() - pass_started)
                if state.endswith("off") or state.startswith("none"):
                    difference = (output.float() - reference.float()).abs().max().item()
                    differences[state] = max(differences.get(state, 0.0), difference)
            adapters.drop_all()

    base = statistics.median(times["none"])
    print()
    print("| state | median s/pass | p90 s/pass | overhead vs none (median) |")
    print("|---|---|---|---|")
    for state in STATES:
        median = statistics.median(times[state])
        print(f"| {state} | {median:.4f} | {p90(times[state]):.4f} | {(median / base - 1) * 100:+.1f}% |")
    print()
    each = ", ".join(f"{load:.3f}" for load in loads)
    print(
        f"load one adapter (apply() of a job naming it: read, convert, inject): median "
        f"{statistics.median(loads):.3f} s of {len(loads)} ({each}); file {megabytes:.1f} MB (fp32, rank "
        f"{args.rank}); adapter weights in the model: {', '.join(sorted(adapter_dtypes))}"
    )
    print(f"switch a loaded adapter on (apply()): median {statistics.median(switches) * 1000:.1f} ms")
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
    print(f"total {time.perf_counter() - started:.0f} s")


def _layer_shapes(shape: Shape) -> list[tuple[int, int]]:
    """(in, out) of the ten linear layers of a block a style LoRA adapts (BLOCK_LINEARS)."""
    width, ffn = shape.width, shape.ffn
    shapes = [(width, width)] * 8 + [(width, ffn), (ffn, width)]
    assert len(shapes) == len(BLOCK_LINEARS)
    return shapes


if __name__ == "__main__":
    main()
