"""`wanbot loras list|download`, and `--lora` on `generate` and `validate`, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.pipeline.video import probe
from tests.cli.test_cli import wanbot

pytestmark = pytest.mark.timeout(180)
CONFIG = """
[models]
t2v = "tiny"
i2v = "tiny"
ti2v = "tiny"

[loras.grain]
repo = "tiny"
file = "grain.safetensors"
description = "film grain"

[loras.glow]
repo = "tiny"
file = "glow.safetensors"
trigger = "glowing"
modes = ["t2v"]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "wanbot.toml"
    path.write_text(CONFIG)
    return path


def test_a_generated_video_uses_the_loras_named_and_loras_list_then_finds_them_on_disk(tmp_path: Path, config: Path):
    data = tmp_path / "data"
    before = json.loads(wanbot("loras", "list", "--json", "--config", str(config), data=data).stdout)
    asked = ("--mode", "t2v", "--prompt", "w1 a fox", "--frames", "5", "--resolution", "64x64", "--seed", "3")
    made = wanbot("generate", *asked, "--lora", "grain:0.5", "--lora", "glow", "--config", str(config), data=data)
    after = wanbot("loras", "list", "--config", str(config), data=data)
    assert made.returncode == 0, made.stderr
    assert "lora grain:0.5, lora glow:0.8" in made.stderr + made.stdout
    assert [(row["name"], row["on_disk"]) for row in before] == [("grain", False), ("glow", False)]
    assert after.stdout.splitlines()[0].startswith("grain: tiny (grain.safetensors), weight 0.8, t2v/i2v/ti2v; /")


def test_validate_and_download_say_what_the_chats_would_with_exit_2(tmp_path: Path, config: Path):
    data = tmp_path / "data"
    fine = wanbot("validate", "--mode", "t2v", "--lora", "grain:0.3", "--json", "--config", str(config), data=data)
    wrong_mode = wanbot("validate", "--mode", "ti2v", "--lora", "glow", "--config", str(config), data=data)
    unknown = wanbot("loras", "download", "sepia", "--config", str(config), data=data)
    tiny = wanbot("loras", "download", "grain", "--config", str(config), data=data)
    no_loop = wanbot("validate", "--mode", "ti2v", "--loop", "--config", str(config), data=data)
    assert fine.returncode == 0 and json.loads(fine.stdout)["loras"] == ["grain:0.3"]
    assert wrong_mode.returncode == 2
    assert "The LoRA glow is not for ti2v. It is for t2v." in wrong_mode.stdout
    assert unknown.returncode == 2 and "There is no LoRA called sepia in [loras] (configured: grain, glow)." in (
        unknown.stderr
    )
    assert tiny.returncode == 0 and "Nothing to download" in tiny.stdout
    assert no_loop.returncode == 2 and "TI2V-5B cannot aim at an end frame, so it makes no loops." in no_loop.stdout


def test_loras_list_without_any_says_how_to_add_one(tmp_path: Path):
    done = wanbot("loras", "list", data=tmp_path)
    assert done.returncode == 0 and "add a [loras.NAME] section" in done.stdout


def test_generate_extend_continues_one_of_the_bots_videos_and_loop_makes_a_loop(tmp_path: Path, config: Path):
    data = tmp_path / "data"
    asked = ("--prompt", "w1 a fox", "--frames", "5", "--resolution", "64x64", "--config", str(config))
    first = wanbot("generate", "--mode", "t2v", *asked, "--out", str(tmp_path / "fox.mp4"), data=data)
    assert first.returncode == 0, first.stderr
    [video] = (data / "outputs").glob("job-1-*.mp4")
    again = ("--prompt", "w2 the fox leaps", "--config", str(config))
    extended = wanbot("generate", "--extend", str(video), *again, data=data)
    stranger = wanbot("generate", "--mode", "i2v", "--extend", str(tmp_path / "fox.mp4"), *again, data=data)
    ignored = wanbot("generate", "--extend", str(video), *asked, "--seed", "7", "--loop", data=data)
    looped = wanbot("generate", "--mode", "t2v", "--loop", *asked, data=data)
    assert extended.returncode == 0, extended.stderr
    assert "extends #1" in extended.stderr
    assert probe(extended.stdout.split()[0]).frames == 5 + 5 - 1  # the fox's frames, then the new ones but one
    assert stranger.returncode == 2 and "is not a video this bot made" in stranger.stderr
    assert ignored.returncode == 2
    assert "takes no --frames, --resolution, --seed, --loop." in " ".join(ignored.stderr.split())
    assert looped.returncode == 0 and "job #3:" in looped.stderr  # nothing was queued for the refused ones
    assert ", loop" in looped.stderr
    no_mode = wanbot("generate", "--prompt", "a fox", data=data)
    assert no_mode.returncode == 2 and "Give --mode: t2v, i2v or ti2v" in no_mode.stderr


def test_validate_checks_a_prompt_against_the_blocked_terms_and_shows_the_enhancers_rewrite(tmp_path: Path):
    data = tmp_path / "data"
    config = tmp_path / "wanbot.toml"
    config.write_text(
        '[models]\nt2v = "tiny"\n\n[safety]\nblocked_terms = ["gore"]\n\n'
        '[prompts]\nenhancer = "local"\nenhancer_repo = "tiny"\nenhancer_max_new_tokens = 12\n'
    )
    blocked = wanbot("validate", "--mode", "t2v", "--prompt", "a Gore fest", "--config", str(config), data=data)
    rewritten = wanbot(
        "validate", "--mode", "t2v", "--prompt", "a fox", "--enhance", "--json", "--config", str(config), data=data
    )
    no_prompt = wanbot("validate", "--mode", "t2v", "--enhance", "--config", str(config), data=data)
    assert blocked.returncode == 2
    assert 'This bot does not make videos of that. Your prompt holds "gore"' in " ".join(blocked.stdout.split())
    assert rewritten.returncode == 0, rewritten.stdout + rewritten.stderr
    report = json.loads(rewritten.stdout)
    assert report["valid"] and report["enhanced"] and report["enhanced"] != "a fox"
    assert no_prompt.returncode == 2 and "--enhance rewrites a prompt: give it with --prompt." in no_prompt.stdout
