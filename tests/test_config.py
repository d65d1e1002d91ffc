from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.config import Settings, load_settings
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch):
    import os

    for name in list(os.environ):
        if name.startswith("WANBOT_"):
            monkeypatch.delenv(name)


def test_defaults_without_a_file():
    settings = load_settings()
    assert settings.queue.per_user_limit == 3
    assert settings.images.max_pixels == 64_000_000
    assert settings.models.t2v == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"


def test_toml_file_and_environment_with_environment_winning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "wanbot.toml"
    config.write_text('data_dir = "/srv/a"\n[queue]\nper_user_limit = 7\nglobal_limit = 9\n[models]\nt2v = "tiny"\n')
    monkeypatch.setenv("WANBOT_QUEUE__GLOBAL_LIMIT", "11")
    monkeypatch.setenv("WANBOT_DATA_DIR", "/srv/b")
    settings = load_settings(config)
    assert settings.queue.per_user_limit == 7
    assert settings.queue.global_limit == 11
    assert settings.models.t2v == "tiny"
    assert settings.data_dir == Path("/srv/b")
    assert settings.db_path == Path("/srv/b/wanbot.sqlite3")


def test_config_path_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "other.toml"
    config.write_text("[generation]\ntimeout_s = 12.5\n")
    monkeypatch.setenv("WANBOT_CONFIG", str(config))
    assert load_settings().generation.timeout_s == 12.5


def test_bad_value_names_the_key_and_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANBOT_IMAGES__MAX_PIXELS", "lots")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.count("\n") == 0
    assert "images.max_pixels" in message and "'lots'" in message and "WANBOT_IMAGES__MAX_PIXELS" in message


def test_unknown_key_and_broken_toml_and_missing_file(tmp_path: Path):
    config = tmp_path / "wanbot.toml"
    config.write_text("[queue]\nper_user_limt = 4\n")
    with pytest.raises(ConfigError, match=r"queue\.per_user_limt: Extra inputs are not permitted"):
        load_settings(config)
    config.write_text("[queue\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_example_config_documents_every_key_with_its_default(tmp_path: Path):
    example = (REPO / "wanbot.example.toml").read_text()
    # Placeholders ("<...>") stand for values without a default, such as the token; they stay commented.
    uncommented = re.sub(r"^# (\w+ = (?!\"<).*)$", r"\1", example, flags=re.MULTILINE)
    config = tmp_path / "wanbot.toml"
    config.write_text(uncommented)
    from_example = load_settings(config)
    assert from_example.model_dump() == Settings().model_dump()
    for section, fields in Settings().model_dump().items():
        names = fields if isinstance(fields, dict) else {section: fields}
        for name in names:
            assert re.search(rf"^# {name} = ", example, flags=re.MULTILINE), f"{section}.{name} is not documented"
