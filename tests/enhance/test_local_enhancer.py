"""The enhancer as a small instruct model in this process, on the tiny random stand-in: loaded once, greedy and so
repeatable, run off the event loop, limited in time, and fetched from a Hub through wanbot's own downloader."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.config import DownloadsConfig, PromptsConfig
from engine.enhance.enhancer import Enhanced, Enhancer
from engine.enhance.failures import NOT_IN_TIME, UNAVAILABLE
from engine.enhance.local import LocalModel
from engine.enhance.tiny import build_tiny_model, build_tiny_tokenizer, make_tiny_enhancer
from engine.hub.downloads import Downloader
from tests.fake_hub import FakeHub

PROMPT = "a ginger cat in the rain"
REPO_ID = "wanbot-test/Tiny-Instruct"


def tiny(downloader: Downloader, **overrides: object) -> Enhancer:
    return Enhancer(
        PromptsConfig.model_validate({"enhancer": "local", "enhancer_repo": "tiny", **overrides}), downloader
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_enhancer(tmp_path_factory.mktemp("tiny") / "tiny-enhancer")


async def test_the_tiny_model_writes_a_rewrite_that_keeps_the_users_words(downloader: Downloader):
    subject = tiny(downloader)

    await subject.load()
    result = await subject.enhance(PROMPT, "t2v")

    assert (downloader.root / "tiny-enhancer" / "model.safetensors").is_file()
    # Its random words lack "ginger", so the guard puts the user's prompt in front of them.
    assert result.enhanced and result.note is None and result.original == PROMPT
    assert result.prompt.startswith(f"{PROMPT} ") and len(result.prompt) > len(PROMPT) + 20
    assert result.prompt.isprintable()


async def test_the_same_prompt_gets_the_same_rewrite_from_the_same_weights(downloader: Downloader, tmp_path: Path):
    first = tiny(downloader)
    elsewhere = Downloader(tmp_path / "other-models", DownloadsConfig(offline=True))

    once = await first.enhance(PROMPT, "i2v")
    assert await first.enhance(PROMPT, "i2v") == once
    assert await tiny(elsewhere).enhance(PROMPT, "i2v") == once
    assert await first.enhance(PROMPT, "t2v") != once  # the instructions differ with a start picture


async def test_the_model_writes_on_a_thread_of_its_own_and_is_loaded_once(
    downloader: Downloader, monkeypatch: pytest.MonkeyPatch
):
    threads, reads = [], []
    generate, read = LocalModel._generate, LocalModel._read

    def spy_generate(self: LocalModel, system: str, user: str) -> str:
        threads.append(threading.current_thread())
        return generate(self, system, user)

    def spy_read(self: LocalModel, folder: Path):
        reads.append(folder)
        return read(self, folder)

    monkeypatch.setattr(LocalModel, "_generate", spy_generate)
    monkeypatch.setattr(LocalModel, "_read", spy_read)
    subject = tiny(downloader)

    for _ in range(2):
        assert (await subject.enhance(PROMPT, "t2v")).enhanced

    assert len(threads) == 2 and threading.main_thread() not in threads
    assert reads == [downloader.root / "tiny-enhancer"]


async def test_a_rewrite_that_takes_too_long_gives_the_users_words(
    downloader: Downloader, caplog: pytest.LogCaptureFixture
):
    subject = tiny(downloader, enhancer_timeout_s=1e-9)

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        result = await subject.enhance(PROMPT, "t2v")

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=NOT_IN_TIME)
    assert "the local model wrote for 1e-09 s without finishing" in caplog.text


async def test_a_model_folder_is_used_where_it_is(downloader: Downloader, tiny_folder: Path):
    subject = tiny(downloader, enhancer_repo=str(tiny_folder), enhancer_max_new_tokens=20)

    assert (await subject.enhance(PROMPT, "t2v")).enhanced
    assert not (downloader.root / "tiny-enhancer").exists()
    assert subject.describe() == (
        f"prompt enhancer: local {tiny_folder} on cpu, up to 20 tokens; rewrites in the prompt's language"
    )


async def test_a_folder_without_a_chat_template_is_no_instruct_model_and_is_logged(
    downloader: Downloader, tiny_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_folder, plain)
    (plain / "chat_template.jinja").unlink()
    subject = tiny(downloader, enhancer_repo=str(plain))

    with caplog.at_level(logging.WARNING, logger="engine.enhance"):
        await subject.load()
        result = await subject.enhance(PROMPT, "t2v")

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=UNAVAILABLE)
    assert caplog.text.count("its tokenizer has no chat template") == 2  # at start, then at the request


def sharded_with_template_inside(folder: Path) -> Path:
    """The tiny model as older and larger Hub models keep it: weights in shards, the template in
    tokenizer_config.json."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    build_tiny_model(len(tokenizer)).save_pretrained(folder, max_shard_size="40KB")
    return folder


@pytest.fixture(params=["one file, template apart", "shards, template inside"])
async def hub(request: pytest.FixtureRequest, tiny_folder: Path, tmp_path: Path) -> AsyncIterator[FakeHub]:
    served = tmp_path / "served"
    if request.param == "one file, template apart":
        shutil.copytree(tiny_folder, served)
    else:
        sharded_with_template_inside(served)
    (served / "README.md").write_text("# model card")
    server = FakeHub(REPO_ID, served)
    await server.start()
    yield server
    await server.stop()


async def test_a_hub_model_is_fetched_with_wanbots_downloader_only_the_files_it_needs(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    downloads = DownloadsConfig(endpoint=hub.url, retries=0, backoff_s=0.01, reserve_bytes=0)
    downloader = Downloader(tmp_path / "models", downloads)
    subject = tiny(downloader, enhancer_repo=REPO_ID)

    await subject.load()
    result = await subject.enhance(PROMPT, "t2v")

    assert result.enhanced and result.note is None
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if "/resolve/" in path and method == "GET"}
    assert "README.md" not in fetched and "generation_config.json" not in fetched
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= fetched
    assert {name for name in hub.files if name.endswith((".safetensors", ".index.json"))} <= fetched
    assert ("chat_template.jinja" in hub.files) == ("chat_template.jinja" in fetched)


async def test_a_hub_model_that_cannot_be_fetched_gives_the_users_words(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    hub = FakeHub(REPO_ID, tiny_folder)
    await hub.start()
    downloads = DownloadsConfig(endpoint=hub.url, retries=0, backoff_s=0.01, reserve_bytes=0)
    subject = tiny(Downloader(tmp_path / "models", downloads), enhancer_repo="wanbot-test/No-Such-Model")

    try:
        with caplog.at_level(logging.WARNING, logger="engine.enhance"):
            result = await subject.enhance(PROMPT, "t2v")
    finally:
        await hub.stop()

    assert result == Enhanced(PROMPT, PROMPT, enhanced=False, note=UNAVAILABLE)
    assert "the local model wanbot-test/No-Such-Model could not be fetched" in caplog.text
