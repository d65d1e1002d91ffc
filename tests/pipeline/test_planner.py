"""The placement planner as a pure function: which plan each card and host gets for each model, size and preset,
its memory figures against the ones measured on the H200, and what a job that nothing fits is told."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.pipeline.footprint import GIB, footprint
from engine.pipeline.planner import JobSize, Machine, NoPlanFits, Plan, Where, candidates, choose
from engine.pipeline.tiny import make_tiny_model
from engine.storage.images import Mode

T2V, I2V, TI2V = "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"
# What each card offers a process: the CUDA context and the driver take the rest.
CARDS = {24: 22.5, 32: 30.5, 48: 46.5, 80: 78.5, 141: 139.0}
SIZES = {"480p": (832, 480, 81), "720p": (1280, 720, 81), "ti2v": (1280, 704, 121)}
FAST = {T2V: 4, I2V: 4, TI2V: 3}
QUALITY = {T2V: 80, I2V: 80, TI2V: 100}


def job(family: str, size: str, preset: str) -> JobSize:
    width, height, frames = SIZES[size]
    return JobSize(width, height, frames, (FAST if preset == "fast" else QUALITY)[family])


def plan(family: str, size: str, preset: str, card: int, host: int, fp8: bool = False) -> str:
    """The chosen plan in short: its name, +text when the text encoder stays, +tiled when the VAE tiles."""
    machine = Machine(vram=int(CARDS[card] * GIB), ram=host * GIB, fp8=fp8)
    try:
        chosen = choose(footprint(family, None), job(family, size, preset), machine)
    except NoPlanFits:
        return "none"
    text = "+text" if chosen.text_encoder is Where.GPU else ""
    return chosen.memory + text + ("+tiled" if chosen.vae_tiled else "")


@pytest.mark.parametrize("preset", ["fast", "quality"])
@pytest.mark.parametrize(
    ("family", "size", "card", "host", "fp8", "expected"),
    [
        # An H200: everything stays, the text encoder too.
        (T2V, "480p", 141, 128, False, "gpu+text"),
        (T2V, "720p", 141, 128, False, "gpu+text"),
        (TI2V, "ti2v", 141, 32, False, "gpu+text"),
        # An 80 GB H100: both experts stay once the text encoder leaves after encoding (model offload before).
        (T2V, "480p", 80, 128, False, "gpu"),
        (I2V, "480p", 80, 64, False, "gpu"),
        (T2V, "720p", 80, 64, False, "gpu+tiled"),  # a 720p decode does not fit beside both experts whole
        (T2V, "720p", 80, 128, True, "gpu+text"),  # in fp8 there is room for all of it
        # 48 GB cards: both experts in fp8 stay on the GPU; in bf16 they must take turns, from host memory.
        (T2V, "480p", 48, 64, True, "gpu"),
        (T2V, "720p", 48, 64, True, "gpu+tiled"),
        (T2V, "480p", 48, 64, False, "none"),  # the experts waiting in host memory need 67 GiB of it
        # 24 and 32 GB cards: A14B streams its blocks from host memory, which must hold the whole model.
        (T2V, "480p", 24, 128, False, "group_offload"),
        (T2V, "480p", 32, 128, True, "group_offload"),
        (T2V, "480p", 24, 32, False, "none"),
        # TI2V-5B's whole decode needs 20 GiB: on 32 GB the parts take turns so that it need not tile.
        (TI2V, "ti2v", 32, 32, False, "model_offload"),
        (TI2V, "ti2v", 24, 64, True, "gpu+tiled"),
    ],
)
def test_the_planner_picks_for_each_card_and_host(
    family: str, size: str, preset: str, card: int, host: int, fp8: bool, expected: str
):
    assert plan(family, size, preset, card, host, fp8) == expected


def test_every_model_size_preset_card_and_host_gets_a_plan_that_fits_or_a_reason():
    for family, sizes in ((T2V, ("480p", "720p")), (I2V, ("480p", "720p")), (TI2V, ("ti2v",))):
        model = footprint(family, None)
        for size in sizes:
            for preset in ("fast", "quality"):
                for gib in CARDS.values():
                    for host in (32, 64, 128):
                        machine = Machine(vram=int(gib * GIB), ram=host * GIB)
                        try:
                            chosen = choose(model, job(family, size, preset), machine)
                        except NoPlanFits as refusal:
                            assert "GiB" in refusal.message
                            continue
                        assert chosen.vram <= gib * GIB * 0.92 and chosen.ram <= host * GIB
                        assert chosen.seconds is not None and chosen.seconds > 0 and chosen.why


def test_the_estimates_cover_the_peaks_measured_on_the_h200():
    """The planner's peaks (the text encoder left out where it is swapped) against bench/results/gpu-h200-*.jsonl:
    never below the measurement, and not more than a tenth above it."""

    def peak(family: str, size: str, preset: str, memory: str, tiled: bool) -> float:
        plans = candidates(footprint(family, None), job(family, size, preset), Machine(141 * GIB, 512 * GIB))
        chosen = next(
            p for p in plans if p.memory == memory and p.vae_tiled == tiled and p.text_encoder is not Where.GPU
        )
        return max(bytes_ for phase, bytes_ in chosen.phases if phase != "encode") / GIB

    measured = [
        (peak(T2V, "480p", "quality", "gpu", tiled=False), 62.73),  # with the untiled decode
        (peak(I2V, "480p", "quality", "model_offload", tiled=False), 30.75),
        (peak(TI2V, "ti2v", "quality", "gpu", tiled=True), 17.83),
    ]
    for estimate, figure in measured:
        assert figure <= estimate <= figure * 1.1, (estimate, figure)


def test_a_job_the_card_cannot_hold_is_refused_with_the_memory_it_needs():
    machine = Machine(vram=8 * GIB, ram=128 * GIB)
    with pytest.raises(NoPlanFits) as refusal:
        choose(footprint(T2V, None), job(T2V, "720p", "fast"), machine)
    assert "1280x720, 81 frames" in refusal.value.message
    assert "GPU memory" in refusal.value.message and "8.0 GiB" in refusal.value.message
    # diffusers streams the text encoder as one group (it has no list of blocks): only layer by layer fits.
    assert choose(footprint(T2V, None), job(T2V, "480p", "fast"), machine).memory == "sequential_offload"


def test_a_leaner_plan_after_running_out_of_memory_needs_less_gpu_memory():
    model, size = footprint(T2V, None), job(T2V, "480p", "fast")
    machine = Machine(vram=int(CARDS[80] * GIB), ram=128 * GIB)
    first = choose(model, size, machine)
    second = choose(model, size, machine, leaner_than=first)
    assert second.vram < first.vram
    assert "ran out of memory with gpu" in second.why
    third = choose(model, size, machine, leaner_than=second)
    assert third.vram < second.vram


def test_a_named_memory_setting_is_kept_even_where_it_may_not_fit():
    model, size = footprint(T2V, None), job(T2V, "480p", "fast")
    machine = Machine(vram=int(CARDS[24] * GIB), ram=128 * GIB)
    named = choose(model, size, machine, memory="gpu")
    assert named.memory == "gpu" and not named.fits
    assert "generation.memory is gpu, which may not fit" in named.why
    assert choose(model, size, Machine(vram=int(CARDS[80] * GIB), ram=128 * GIB), memory="model_offload").fits


def test_vae_tiling_on_or_off_is_respected_and_auto_tiles_only_when_needed():
    model, size = footprint(T2V, None), job(T2V, "720p", "fast")
    machine = Machine(vram=int(CARDS[80] * GIB), ram=128 * GIB)
    assert choose(model, size, machine, vae_tiling="on").vae_tiled
    assert not choose(model, size, machine, vae_tiling="off").vae_tiled
    assert not choose(model, job(T2V, "480p", "fast"), machine).vae_tiled


def test_no_gpu_means_the_cpu_plan():
    chosen = choose(footprint(T2V, None), job(T2V, "480p", "fast"), Machine(vram=None, ram=16 * GIB))
    assert (chosen.memory, chosen.experts, chosen.seconds) == ("cpu", Where.CPU, None)


def test_the_plan_reads_as_lines_naming_each_part():
    model = footprint(T2V, None)
    chosen: Plan = choose(model, job(T2V, "480p", "fast"), Machine(vram=int(CARDS[48] * GIB), ram=64 * GIB, fp8=True))
    text = "\n".join(chosen.lines(model))
    assert "text encoder (10.6 GiB): in pinned host memory" in text
    assert "transformers (26.6 + 26.6 GiB): on the GPU in fp8" in text
    assert "fp8 (generation.fp8)" in text


def test_a_folders_footprint_is_its_components_own_size(tmp_path: Path):
    folder = make_tiny_model(tmp_path / "tiny-t2v", Mode.T2V)
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(folder)

    def size(module: torch.nn.Module, per: int) -> int:
        return per * (sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers()))

    model = footprint("tiny-t2v", folder)
    assert model.experts == (size(pipeline.transformer, 2), size(pipeline.transformer_2, 2))
    assert model.text_encoder == size(pipeline.text_encoder, 2)
    assert model.vae == size(pipeline.vae, 4)
    assert model.tokens(64, 64, 9) == 3 * 4 * 4  # latent frames x (64 / 16) squared


def test_a_bf16_vae_halves_its_weights_and_shrinks_the_whole_decode():
    model, size = footprint(TI2V, None), job(TI2V, "ti2v", "fast")
    fp32 = Machine(vram=int(CARDS[80] * GIB), ram=64 * GIB)
    bf16 = Machine(vram=int(CARDS[80] * GIB), ram=64 * GIB, vae_bf16=True)

    def decode_peak(machine: Machine) -> int:
        plans = candidates(model, size, machine)
        whole = next(p for p in plans if p.memory == "model_offload" and not p.vae_tiled)
        return dict(whole.phases)["decode"]

    saved = decode_peak(fp32) - decode_peak(bf16)
    assert model.vae // 2 < saved < model.vae // 2 + 0.35 * model.measured.decode_bytes_per_pixel * 1280 * 704
