"""The [prompts] settings: off unless asked for, and an endpoint that cannot work refused at start, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import PromptsConfig, Settings, load_settings
from engine.errors import ConfigError


def test_the_enhancer_is_off_by_default():
    prompts = Settings().prompts
    assert prompts == PromptsConfig()
    assert (prompts.enhancer, prompts.enhancer_language, prompts.enhancer_device) == ("off", "keep", "cpu")
    assert (prompts.enhancer_timeout_s, prompts.enhancer_retries, prompts.enhancer_max_new_tokens) == (20.0, 2, 200)
    assert prompts.enhancer_key_env == "WANBOT_ENHANCER_KEY"


def test_openai_without_an_endpoint_url_is_refused_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    config = tmp_path / "wanbot.toml"
    config.write_text('[prompts]\nenhancer = "openai"\n')

    with pytest.raises(ConfigError, match=r"prompts\.enhancer_url: .*base URL when prompts\.enhancer is 'openai'"):
        load_settings(config)

    config.write_text('[prompts]\nenhancer = "openai"\nenhancer_url = "http://127.0.0.1:8000/v1"\n')
    assert load_settings(config).prompts.enhancer_url == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "auto"])
def test_the_local_model_runs_on_a_cpu_a_gpu_or_whichever_there_is(device: str):
    assert PromptsConfig(enhancer_device=device).enhancer_device == device


@pytest.mark.parametrize("value", ["gpu", "cuda:", "mps"])
def test_a_device_torch_would_not_take_is_refused(value: str):
    with pytest.raises(ValueError, match="enhancer_device"):
        PromptsConfig(enhancer_device=value)
