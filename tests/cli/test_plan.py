"""`wanbot plan`: the plan for a job on this machine or on the memory given, every placement beside it, and the
line a job that nothing fits gets; and the same refusal before a job is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from engine.config import Settings
from engine.jobs import JobSource
from engine.pipeline import generate
from engine.pipeline.footprint import GIB
from engine.pipeline.models import GenerationRequest
from engine.pipeline.planner import Machine, NoPlanFits
from engine.service import Engine
from engine.storage.images import Mode

A14B = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"


def plan(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    config = tmp_path / "wanbot.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    done = CliRunner().invoke(app, ["plan", "--config", str(config), *args], env={"COLUMNS": "120"})
    return done.exit_code, done.stdout, done.stderr


def test_plan_for_a_72_gib_card_keeps_both_experts_on_it_and_lists_every_placement(tmp_path: Path):
    code, out, err = plan(tmp_path, "--vram", "72", "--ram", "128", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == A14B and report["job"] == "832x480, 81 frames, fast (4 transformer passes)"
    assert report["chosen"][0].startswith("plan: gpu (peak ")
    assert "text encoder (10.6 GiB): in pinned host memory" in report["chosen"][1]
    assert "transformers (26.6 + 26.6 GiB): on the GPU" in report["chosen"][2]
    memories = {row["memory"] for row in report["placements"]}
    assert memories == {"gpu", "model_offload", "group_offload", "sequential_offload"}
    seconds = [row["seconds"] for row in report["placements"]]
    assert seconds == sorted(seconds)


def test_plan_reads_as_a_table(tmp_path: Path):
    code, out, _ = plan(tmp_path, "--vram", "48", "--fp8", "--size", "720p", "--ram", "64")
    assert code == 0
    assert "t2v: Wan-AI/Wan2.2-T2V-A14B-Diffusers, 1280x720, 81 frames, fast" in out
    assert "on a GPU with 48.0 GiB, 64 GiB host memory, fp8 on" in out
    assert "transformers (26.6 + 26.6 GiB): on the GPU in fp8" in out
    assert "VAE (0.2 GiB in bf16): on the GPU, decoding whole" in out
    assert "every placement, fastest first:" in out and "GPU, fp8" in out


def test_a_card_too_small_for_the_size_exits_1_saying_what_fits(tmp_path: Path):
    code, out, err = plan(tmp_path, "--vram", "8", "--ram", "128", "--size", "720p")
    assert code == 1
    assert "A 1280x720, 81 frames video needs at least" in err and "this GPU offers 8.0 GiB" in err
    assert "Ask for res=480p: that fits this GPU." in err
    assert "plan:" not in out


def test_a_bad_size_is_one_line_and_exit_2(tmp_path: Path):
    code, _, err = plan(tmp_path, "--size", "huge")
    assert code == 2 and "huge" in err and "Traceback" not in err


def test_without_a_gpu_the_plan_is_the_cpu(tmp_path: Path):
    code, out, _ = plan(tmp_path, "--mode", "ti2v", "--preset", "quality")
    assert code == 0
    assert "1280x704, 121 frames, quality (100 transformer passes)" in out
    assert "on no GPU (the CPU)" in out and "plan: cpu" in out


async def test_a_job_no_plan_fits_is_refused_before_it_is_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    small = Machine(vram=8 * GIB, ram=128 * GIB)
    monkeypatch.setattr(generate, "this_machine", lambda config, device, fp8: small)
    engine = await Engine.open(Settings(data_dir=tmp_path / "data", models={"t2v": A14B}))
    try:
        request = GenerationRequest(mode=Mode.T2V, prompt="a fox", resolution="720p")
        with pytest.raises(NoPlanFits) as refusal:
            await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="u"))
        assert "this GPU offers 8.0 GiB" in refusal.value.message and "res=480p" in refusal.value.hint
        assert await engine._queue.list_jobs() == []
        fits = GenerationRequest(mode=Mode.T2V, prompt="a fox", resolution="480p")
        submission = await engine.submit(fits, JobSource(platform="cli", chat_id="c", user_id="u"))
        assert submission.result.created
    finally:
        await engine.close()
