"""`wanbot plan`: where each part of a model would live for a job on this machine (or on the memory given), what
that needs and how long a video takes, and every other placement beside it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from bot.cli.common import ConfigOption, JsonOption, console, errors, settings_from
from engine.errors import UserError
from engine.operator import plan_report, quiet_libraries
from engine.storage.images import Mode


def plan_command(
    mode: Annotated[Mode, typer.Option("--mode", help="t2v, i2v or ti2v: the model configured for it.")] = Mode.T2V,
    preset: Annotated[str | None, typer.Option(metavar="P", help="fast or quality (default: the configured).")] = None,
    size: Annotated[
        str | None, typer.Option(metavar="WxH", help="480p, 720p or WIDTHxHEIGHT (default: the model's).")
    ] = None,
    frames: Annotated[int | None, typer.Option(metavar="N", help="Frames (default: the model's).")] = None,
    vram: Annotated[
        float | None, typer.Option(metavar="GiB", help="Plan for a GPU with this much memory (default: this one's).")
    ] = None,
    ram: Annotated[
        float | None, typer.Option(metavar="GiB", help="Plan for this much host memory (default: this machine's).")
    ] = None,
    fp8: Annotated[
        bool, typer.Option("--fp8", metavar="", help="With --vram: a card with fp8 (compute capability 8.9 or newer).")
    ] = False,
    json_out: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Show where the model's parts go for a job, the GPU and host memory it needs and the seconds a video takes;
    exit 1 when nothing fits, saying what would."""
    settings = settings_from(config)
    quiet_libraries()
    try:
        report = plan_report(settings, mode, preset, size, frames, vram, ram, fp8)
    except UserError as exc:
        errors.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    if json_out:
        console.print_json(json.dumps(report.as_json()))
    else:
        console.print(f"{mode.value}: {report.model}, {report.job}", highlight=False)
        console.print(f"on {report.machine}", highlight=False)
        for line in report.chosen:
            console.print(line, highlight=False)
        console.print("every placement, fastest first:", highlight=False)
        table = Table("placement", "text enc.", "transformers", "VAE", "peak GPU", "host", "a video", "fits")
        for row in report.placements:
            seconds = f"{row['seconds']:.0f} s" if row["seconds"] is not None else "-"
            table.add_row(
                row["memory"],
                row["text_encoder"],
                row["transformers"],
                "tiled" if row["vae_tiled"] else "whole",
                f"{row['peak_vram_gib']:.1f} GiB",
                f"{row['host_ram_gib']:.0f} GiB",
                seconds,
                "yes" if row["fits"] else "no",
            )
        console.print(table)
    if report.refusal:
        errors.print(report.refusal, markup=False)
        raise typer.Exit(1)
