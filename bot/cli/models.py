"""`wanbot models ...`: the tiny offline models, downloads of the real ones, what is on disk, and verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bot.cli.common import ConfigOption, JsonOption, console, errors, run_or_exit, settings_from, usage_error
from engine.config import Settings
from engine.errors import UserError
from engine.operator import (
    WeightsToFetch,
    check_repo_id,
    make_tiny_model,
    model_downloader,
    model_named,
    quiet_libraries,
    verify_snapshot,
    weights_to_fetch,
)
from engine.pipeline.presets import Preset
from engine.service import size_text
from engine.storage.images import Mode


def models_make_tiny(
    target: Annotated[Path, typer.Argument(help="Folder to create.")],
    kind: Annotated[Mode, typer.Option("--kind", help="Which pipeline shape: t2v, i2v or ti2v.")] = Mode.T2V,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the random weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a model already in the folder.")] = False,
) -> None:
    """Build a randomly initialised tiny Wan pipeline and save it as a diffusers folder."""
    if target.exists() and not target.is_dir():
        raise usage_error(f"{target} is a file, not a folder. Name a new or empty folder.")
    if target.is_dir() and any(target.iterdir()):
        held = _folder_holds(target)
        if not (target / "model_index.json").exists():
            # --force replaces a model, never a folder of something else (`make-tiny . --force` must not empty it).
            raise usage_error(f"{target} already holds {held}, not a model. Name a new or empty folder.")
        if not force:
            fix = "Name a new or empty folder, or add --force to replace it."
            raise usage_error(f"{target} already holds {held}. {fix}")
        shutil.rmtree(target)
    quiet_libraries()
    try:
        # Checked here, before the pipeline is built: a path this user cannot write fails in a second, not after.
        target.parent.mkdir(parents=True, exist_ok=True)
        make_tiny_model(target, kind, seed)
    except OSError as exc:
        raise usage_error(
            f"The tiny model could not be written to {target} ({exc.strerror}). Choose a folder this user can write."
        ) from None
    size = sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
    console.print(f"tiny {kind.value} model in {target} ({size / 1024:.0f} KiB)", highlight=False)


def _folder_holds(folder: Path) -> str:
    """What a folder holds, in a few words: which Wan model, or how many entries."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        entries = sorted(path.name for path in folder.iterdir())
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown})"
    kind = "i2v" if index.get("_class_name") == "WanImageToVideoPipeline" else "t2v"
    kind = "ti2v" if index.get("expand_timesteps") else kind
    return f"a {kind} model ({index.get('_class_name')})"


def _repo_for(name: str, settings: Settings) -> str:
    """A mode names the model configured for it; anything else is taken as a repo id, checked by its form."""
    if name in {mode.value for mode in Mode}:
        return getattr(settings.models, name)
    try:
        check_repo_id(name)
    except UserError as exc:
        errors.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    return name


def models_download(
    name: Annotated[
        str,
        typer.Argument(
            help="t2v, i2v, ti2v or all (the configured models, with what the fast preset needs) or a repo id."
        ),
    ],
    revision: Annotated[str, typer.Option(metavar="REV", help="A branch, tag or commit of a repo id.")] = "main",
    preset: Annotated[
        Preset,
        typer.Option(
            "--preset", help="fast (default): the fast preset's distilled weights too; quality: the models alone."
        ),
    ] = Preset.FAST,
    config: ConfigOption = None,
) -> None:
    """Download a model (only the files the pipeline needs), resuming whatever an earlier run fetched; for a mode,
    also what its default fast preset runs on, so a worker can make a default video without a network afterwards."""

    settings = settings_from(config)
    try:
        wanted = weights_to_fetch(settings, name, quality_only=preset is Preset.QUALITY)
    except UserError as exc:
        errors.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    if not wanted:
        console.print(f"Nothing to download: the {name} model is tiny or a folder on this machine.", highlight=False)
    downloader = model_downloader(settings)
    for item in wanted:
        folder = run_or_exit(download_with_bar(downloader, item, revision if item.what == item.repo_id else "main"))
        shown = item.repo_id if item.files is None else f"{item.repo_id} ({', '.join(item.files)})"
        why = "" if item.what == item.repo_id else f", {item.what}"
        console.print(f"{shown} is complete in {folder}{why}", highlight=False)


async def download_with_bar(downloader: Any, item: WeightsToFetch, revision: str) -> Path:
    """Download `item`, with a progress bar on a terminal; the folder it is complete in."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(),
    )
    # A bar only where someone watches it: in a log or a pipe it would leave a line of its own before the result.
    with Progress(*columns, console=errors, disable=not errors.is_terminal) as bar:
        task = bar.add_task(item.repo_id, total=None, speed="")

        def show(progress: Any) -> None:
            bar.update(
                task,
                completed=progress.done_bytes,
                total=progress.total_bytes,
                speed=f"{size_text(int(progress.speed_bps))}/s",
            )

        files = list(item.files) if item.files is not None else None
        return await downloader.download(item.repo_id, revision, on_progress=show, files=files)


def models_list(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """The configured models: on disk or not, size on disk (at once), size still to download (asked briefly)."""

    settings = settings_from(config)
    downloader = model_downloader(settings)

    def describe(mode: Mode) -> list[dict[str, Any]]:
        """The mode's model and, for the fast preset (the default), its distilled weights."""
        model = model_named(getattr(settings.models, mode.value), mode)
        if model.is_tiny or model.is_local:
            folder = settings.models_dir / model.name if model.is_tiny else Path(model.name)
            built = (folder / "model_index.json").exists()
            # A tiny model is built on first use, with its fast stand-ins: nothing to download.
            return [_row(mode.value, model.name, folder if built else None, 0)]
        rows = []
        for item in weights_to_fetch(settings, mode.value):
            files = list(item.files) if item.files is not None else None
            folder = downloader.local_files(item.repo_id, files) if files else downloader.local_snapshot(item.repo_id)
            label = mode.value if item.repo_id == model.name else f"{mode.value} fast"
            name = item.repo_id if files is None else f"{item.repo_id}: {', '.join(files)}"
            row = _row(label, name, folder, None, files)
            row["repo_id"], row["files"] = item.repo_id, files
            rows.append(row)
        return rows

    async def work() -> list[dict[str, Any]]:
        rows = [row for mode in Mode for row in describe(mode)]  # from disk: no waiting on a network
        # Then the Hub, once and briefly, for what is missing: without a network this answers in seconds.
        missing = [row for row in rows if row["bytes_to_download"] is None]
        to_check = list(dict.fromkeys(row["repo_id"] for row in missing))
        wanted = {row["repo_id"]: row["files"] for row in missing if row["files"]}
        for size in await downloader.sizes_to_download(to_check, files=wanted):
            for row in missing:
                if row["repo_id"] == size.repo_id:
                    row["bytes_to_download"] = size.missing_bytes
                    row["not_checked"] = size.not_checked or None
        for row in rows:
            row.pop("repo_id", None), row.pop("files", None)
        return rows

    rows = run_or_exit(work())
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("mode", "model", "on disk", "size on disk", "to download")
    for row in rows:
        to_get = (
            f"not checked: {row['not_checked']}"
            if row["bytes_to_download"] is None
            else size_text(row["bytes_to_download"])
        )
        on_disk = "yes" if row["on_disk"] else "no"
        table.add_row(row["mode"], row["model"], on_disk, size_text(row["bytes_on_disk"]), to_get)
    console.print(table)


def _row(
    mode: str, model: str, folder: Path | None, to_download: int | None, files: list[str] | None = None
) -> dict[str, Any]:
    """One line of `models list`: `folder` holds the model (or just `files` of a repo), None when it is not here."""
    on_disk = folder is not None and folder.is_dir()
    paths = [folder / name for name in files] if folder and files else folder.rglob("*") if folder else []
    size = sum(path.stat().st_size for path in paths if path.is_file()) if on_disk else 0
    return {
        "mode": mode,
        "model": model,
        "on_disk": on_disk,
        "bytes_on_disk": size,
        "bytes_to_download": 0 if on_disk else to_download,
        "not_checked": None,
    }


def models_verify(
    name: Annotated[str, typer.Argument(help="t2v, i2v, ti2v (the configured model) or a repo id.")],
    config: ConfigOption = None,
) -> None:
    """Check a downloaded model's files against their sizes and sha256. Exit 0 intact, 2 not."""

    settings = settings_from(config)
    repo_id = _repo_for(name, settings)
    folder = model_downloader(settings).local_snapshot(repo_id)
    if folder is None:
        errors.print(f"{repo_id} is not downloaded. Run: wanbot models download {name}")
        raise typer.Exit(2)
    problems = verify_snapshot(folder)
    for problem in problems:
        errors.print(f"{repo_id}: {problem}", markup=False)
    if problems:
        raise typer.Exit(2)
    console.print(f"{repo_id} is intact ({folder})", highlight=False)
