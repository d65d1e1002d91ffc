"""The picture classifier, on tiny stand-ins whose answer is fixed: one verdict for a batch, labels checked against
the model's at load, built or fetched once, a folder used where it is, a Hub model fetched with wanbot's own
downloader, and the frames of a video it looks at."""

from __future__ import annotations

import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from engine.config import DownloadsConfig, SafetyConfig
from engine.hub.downloads import Downloader
from engine.safety.classifier import (
    MODEL_FILES,
    NOT_FLAGGED,
    ClassifierUnavailable,
    PictureClassifier,
    Verdict,
    frames_to_check,
)
from engine.safety.tiny import make_tiny_classifier
from tests.fake_hub import FakeHub

REPO_ID = "wanbot-test/Tiny-NSFW-Detection"


def classifier(downloader: Downloader, models_dir: Path, **overrides: object) -> PictureClassifier:
    config = SafetyConfig.model_validate({"classifier": "tiny:nsfw", **overrides})
    return PictureClassifier(config, downloader, models_dir)


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests' tiny classifiers are built, once for the module."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def nsfw_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny") / "always-nsfw", "nsfw")


async def test_a_classifier_forced_to_nsfw_flags_every_picture(
    downloader: Downloader, models_dir: Path, pictures: list[Image.Image]
):
    subject = classifier(downloader, models_dir)

    verdict = await subject.check(pictures)
    alone = await subject.check(pictures[1:])

    assert verdict.flagged and verdict.label == "nsfw" and verdict.score > 0.99
    assert alone.flagged and alone.score > 0.99
    assert (models_dir / "tiny-classifier-nsfw" / "model.safetensors").is_file()


async def test_a_classifier_forced_to_normal_flags_nothing(
    downloader: Downloader, models_dir: Path, pictures: list[Image.Image]
):
    verdict = await classifier(downloader, models_dir, classifier="tiny:normal").check(pictures)

    assert not verdict.flagged and verdict.label == "nsfw" and verdict.score < 0.01


async def test_a_label_of_its_own_can_be_forced_and_flagged(
    downloader: Downloader, models_dir: Path, pictures: list[Image.Image]
):
    violence = classifier(downloader, models_dir, classifier="tiny:violence", flagged_labels=["nsfw", "Violence"])
    nsfw_only = classifier(downloader, models_dir, classifier="tiny:violence")

    assert (await violence.check(pictures)).label == "violence"
    assert (await violence.check(pictures)).flagged
    assert not (await nsfw_only.check(pictures)).flagged


async def test_the_threshold_decides(downloader: Downloader, models_dir: Path, pictures: list[Image.Image]):
    strict = await classifier(downloader, models_dir, threshold=1.0).check(pictures)

    assert not strict.flagged and strict.label == "nsfw" and 0.99 < strict.score < 1.0


async def test_pictures_in_other_modes_are_looked_at_as_rgb(downloader: Downloader, models_dir: Path):
    modes = [Image.new("RGBA", (20, 20), (0, 255, 0, 128)), Image.new("L", (33, 17), 200), Image.new("P", (8, 8))]

    assert (await classifier(downloader, models_dir).check(modes)).flagged


async def test_no_pictures_or_the_classifier_off_flag_nothing_and_load_nothing(
    downloader: Downloader, tmp_path: Path, pictures: list[Image.Image]
):
    off = classifier(downloader, tmp_path, classifier="off")

    await off.load()
    assert await off.check(pictures) == NOT_FLAGGED == Verdict(flagged=False, label="", score=0.0)
    assert await classifier(downloader, tmp_path).check([]) == NOT_FLAGGED
    assert off.describe() == "classifier off" and not off.enabled
    assert names(tmp_path) == []


async def test_flagged_labels_the_model_lacks_fail_the_load_naming_its_labels(downloader: Downloader, models_dir: Path):
    subject = classifier(downloader, models_dir, flagged_labels=["nsfw", "porn"])

    with pytest.raises(ClassifierUnavailable) as raised:
        await subject.load()

    assert str(raised.value) == (
        "the picture classifier tiny:nsfw has no label porn: its labels are normal, nsfw. "
        "Set safety.flagged_labels to some of them."
    )


async def test_the_tiny_model_is_built_once_and_loaded_once(
    downloader: Downloader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pictures: list[Image.Image]
):
    reads, threads = [], []
    read, classify = PictureClassifier._read, PictureClassifier._classify

    def spy_read(self: PictureClassifier, folder: Path):
        reads.append(folder)
        return read(self, folder)

    def spy_classify(self: PictureClassifier, images):
        threads.append(threading.current_thread())
        return classify(self, images)

    monkeypatch.setattr(PictureClassifier, "_read", spy_read)
    monkeypatch.setattr(PictureClassifier, "_classify", spy_classify)
    first = classifier(downloader, tmp_path)

    await first.load()
    weights = tmp_path / "tiny-classifier-nsfw" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    await first.load()
    await first.check(pictures)
    await classifier(downloader, tmp_path).load()

    assert reads == [tmp_path / "tiny-classifier-nsfw"] * 2  # once per classifier
    assert weights.stat().st_mtime_ns == built
    assert names(tmp_path) == ["tiny-classifier-nsfw"]  # nothing left aside
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


async def test_the_same_label_gives_the_same_weights(tmp_path: Path, nsfw_folder: Path):
    again = make_tiny_classifier(tmp_path / "again", "nsfw")

    assert (again / "model.safetensors").read_bytes() == (nsfw_folder / "model.safetensors").read_bytes()


async def test_a_model_folder_is_used_where_it_is(
    downloader: Downloader, tmp_path: Path, nsfw_folder: Path, pictures: list[Image.Image]
):
    subject = classifier(downloader, tmp_path / "models", classifier=str(nsfw_folder), threshold=0.75)

    assert (await subject.check(pictures)).flagged
    assert not (tmp_path / "models").exists()
    assert subject.describe() == f"classifier {nsfw_folder} on cpu, flags nsfw at 0.75"


async def test_a_folder_that_is_not_there_or_no_model_is_unavailable(
    downloader: Downloader, tmp_path: Path, nsfw_folder: Path
):
    missing = classifier(downloader, tmp_path, classifier=str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(nsfw_folder, broken)
    (broken / "model.safetensors").unlink()

    with pytest.raises(ClassifierUnavailable, match=f"could not be fetched: There is no folder {tmp_path}/nowhere"):
        await missing.load()
    with pytest.raises(ClassifierUnavailable, match=f"the picture classifier in {broken} could not be loaded"):
        await classifier(downloader, tmp_path, classifier=str(broken)).load()


@pytest.fixture
async def hub(nsfw_folder: Path, tmp_path: Path) -> AsyncIterator[FakeHub]:
    served = tmp_path / "served"
    shutil.copytree(nsfw_folder, served)
    (served / "README.md").write_text("# model card")
    (served / "pytorch_model.bin").write_bytes(b"the same weights, pickled")
    server = FakeHub(REPO_ID, served)
    await server.start()
    yield server
    await server.stop()


def hub_downloader(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Downloader:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    downloads = DownloadsConfig(endpoint=hub.url, retries=0, backoff_s=0.01, reserve_bytes=0)
    return Downloader(tmp_path / "models", downloads)


def fetched(hub: FakeHub) -> list[str]:
    """The files the Hub was asked for, by name."""
    resolved = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    return sorted(path.rsplit("/", 1)[-1] for path in resolved)


async def test_a_hub_model_is_fetched_with_wanbots_downloader_only_the_files_it_needs(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pictures: list[Image.Image]
):
    downloader = hub_downloader(hub, tmp_path, monkeypatch)
    subject = classifier(downloader, tmp_path / "models", classifier=REPO_ID)

    verdict = await subject.check(pictures)
    assert fetched(hub) == sorted(MODEL_FILES)
    # A second classifier finds the files in the cache and asks the Hub nothing.
    hub.requests.clear()
    assert await classifier(downloader, tmp_path / "models", classifier=REPO_ID).check(pictures) == verdict

    assert verdict.flagged and verdict.label == "nsfw"
    assert hub.requests == []
    assert subject.describe() == f"classifier {REPO_ID} on cpu, flags nsfw at 0.5"


async def test_a_hub_model_that_cannot_be_fetched_is_unavailable(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    downloader = hub_downloader(hub, tmp_path, monkeypatch)
    subject = classifier(downloader, tmp_path / "models", classifier="wanbot-test/No-Such-Model")

    with pytest.raises(ClassifierUnavailable, match="the picture classifier wanbot-test/No-Such-Model could not be "):
        await subject.load()


async def test_a_hub_model_is_not_fetched_offline(downloader: Downloader, tmp_path: Path):
    with pytest.raises(ClassifierUnavailable, match=r"not on disk and downloads are off \(offline mode\)"):
        await classifier(downloader, tmp_path, classifier=REPO_ID).load()


@pytest.mark.parametrize(
    ("frames", "n", "expected"),
    [
        (81, 3, [26, 53, 80]),
        (81, 1, [80]),
        (10, 2, [4, 9]),
        (10, 4, [2, 4, 7, 9]),
        (5, 5, [0, 1, 2, 3, 4]),
        (3, 16, [0, 1, 2]),
        (1, 3, [0]),
        (0, 3, []),
    ],
)
def test_frames_to_check_spread_over_the_video_and_end_on_the_last(frames: int, n: int, expected: list[int]):
    assert frames_to_check(frames, n) == expected


def test_frames_to_check_are_unique_sorted_and_as_many_as_asked():
    for frames in range(1, 130):
        for n in range(1, 17):
            picked = frames_to_check(frames, n)
            assert picked == sorted(set(picked)) and len(picked) == min(n, frames)
            assert picked[-1] == frames - 1 and picked[0] >= 0
