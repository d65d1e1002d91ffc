"""`wanbot run`, `wanbot serve` and `wanbot worker`: the long-running processes (bot/roles)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bot.cli.common import ConfigOption, errors, run_or_exit, settings_from, usage_error
from engine.config import Settings


def run_command(config: ConfigOption = None) -> None:
    """Run the worker and the chat adapters that have a token, until Ctrl+C or SIGTERM."""
    _run_role(config, "run")


def serve_command(config: ConfigOption = None) -> None:
    """Run the chat adapters, delivery and clean-up without a worker (no GPU, no model): `wanbot worker` processes,
    here or on other machines sharing database.url, make the videos."""
    _run_role(config, "serve")


def worker_command(
    device: Annotated[
        str | None, typer.Option("--device", help="The GPU to use, such as cuda:1 (default: generation.device).")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            "--devices",
            help="Start one worker process per GPU listed, such as cuda:0,cuda:1 (default: generation.devices).",
        ),
    ] = None,
    parallel: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            max=8,
            help="Make each video on N devices together; with --devices, a worker per N of them "
            "(default: generation.parallel).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Run one GPU worker and nothing else (no chat token needed); with --devices, one worker process per GPU (or
    per --parallel GPUs)."""
    settings = settings_from(config)
    if device and devices:
        raise usage_error("Give --device (one worker) or --devices (one process per GPU), not both.")
    size = parallel or settings.generation.parallel
    listed = [name.strip() for name in devices.split(",") if name.strip()] if devices else settings.generation.devices
    if device is None and listed:
        from bot.roles.worker_processes import run_worker_processes

        if len(listed) % size:
            raise usage_error(f"{len(listed)} devices cannot make workers of --parallel {size} each: list a multiple.")
        groups = [",".join(listed[index : index + size]) for index in range(0, len(listed), size)]
        processes = run_worker_processes(groups, str(config) if config else None, _say, settings.metrics.port, size)
        failure = run_or_exit(processes)
        _exit_on(failure)
        return
    update: dict[str, object] = {"parallel": size}
    if device is not None:
        update["device"] = device
    settings.generation = settings.generation.model_copy(update=update)
    _run_role(config, "worker", settings)


def _say(line: str) -> None:
    errors.print(line, markup=False)


def _run_role(config: Path | None, role: str, settings: Settings | None = None) -> None:
    from bot.roles.runtime import Role, serve

    settings = settings or settings_from(config)
    _exit_on(run_or_exit(serve(settings, _say, Role(role))))


def _exit_on(failure: str | None) -> None:
    if failure:
        # systemd's Restart=on-failure starts it again; exit code 2 stays for what a restart cannot fix.
        errors.print(f"wanbot stopped: {failure}. The log above has the details.", markup=False)
        raise typer.Exit(1)
