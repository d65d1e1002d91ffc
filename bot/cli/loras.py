"""`wanbot loras`: the style and character LoRAs of [loras], on disk or not, and one downloaded ahead of its first job
(through the same downloader as models: only its files, resumable, disk checked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bot.cli.common import ConfigOption, JsonOption, console, errors, run_or_exit, settings_from
from bot.cli.models import download_with_bar
from engine.operator import WeightsToFetch, lora_on_disk, model_downloader

NONE_CONFIGURED = "No LoRAs are configured: add a [loras.NAME] section to the configuration (README: LoRAs)."


def loras_list(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Each LoRA users may name: its files, default weight, modes and trigger words, and whether it is on disk."""
    settings = settings_from(config)
    rows: list[dict[str, Any]] = []
    for name, lora in settings.loras.items():
        folder = lora_on_disk(settings, name)
        rows.append(
            {
                "name": name,
                "repo": lora.repo,
                "files": lora.files,
                "weight": lora.weight,
                "modes": lora.modes,
                "trigger": lora.trigger,
                "description": lora.description,
                "on_disk": folder is not None,
                "folder": str(folder) if folder else None,
            }
        )
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(NONE_CONFIGURED, highlight=False, markup=False)
        return
    for row in rows:
        where = row["folder"] if row["on_disk"] else "not on disk"
        trigger = f", trigger “{row['trigger']}”" if row["trigger"] else ""
        console.print(
            f"{row['name']}: {row['repo']} ({', '.join(row['files'])}), weight {row['weight']:g}, "
            f"{'/'.join(row['modes'])}{trigger}; {where}",
            highlight=False,
            markup=False,
        )


def loras_download(
    name: Annotated[str, typer.Argument(help="A LoRA's name in [loras] (`wanbot loras list` shows them).")],
    config: ConfigOption = None,
) -> None:
    """Download a LoRA's files now, so its first job does not wait for them."""
    settings = settings_from(config)
    lora = settings.loras.get(name)
    if lora is None:
        known = ", ".join(settings.loras) or "none"
        errors.print(f"There is no LoRA called {name} in [loras] (configured: {known}).", markup=False)
        raise typer.Exit(2)
    if lora.repo == "tiny" or Path(lora.repo).expanduser().is_dir():
        console.print(f"Nothing to download: {name} is a tiny stand-in or a folder on this machine.", highlight=False)
        return
    item = WeightsToFetch(lora.repo, tuple(lora.files), f"the LoRA {name}")
    folder = run_or_exit(download_with_bar(model_downloader(settings), item, "main"))
    console.print(f"{name}: {lora.repo} ({', '.join(lora.files)}) is complete in {folder}", highlight=False)
