"""The `wanbot` command: validate images, manage the queue, generate from the terminal, run the demo and the bot.

One module per command group: generate.py (validate, generate, demo), queue.py (`wanbot queue ...`), fleet.py
(workers, backup), models.py (`wanbot models ...`), loras.py (`wanbot loras ...`) and roles.py (run, serve,
worker); common.py holds the Typer apps, the shared options and the way every command turns a mistake into one line
and exit code 2. The commands are registered here, in the order `--help` lists them.

May import: bot.chat, bot.roles, engine.service and the engine's records; never engine machinery.
"""

from __future__ import annotations

import sys

from bot.cli import fleet, generate, loras, models, plan, queue, roles
from bot.cli.common import app, errors, loras_app, models_app, queue_app
from engine.errors import ConfigError

app.command()(generate.validate)
queue_app.command("list")(queue.queue_list)
queue_app.command("show")(queue.queue_show)
queue_app.command("cancel")(queue.queue_cancel)
queue_app.command("retry")(queue.queue_retry)
queue_app.command("redeliver")(queue.queue_redeliver)
queue_app.command("stats")(queue.queue_stats)
app.command()(fleet.workers)
app.command()(fleet.backup)
queue_app.command("pause")(queue.queue_pause)
queue_app.command("resume")(queue.queue_resume)
app.command()(generate.generate)
app.command()(generate.demo)
models_app.command("make-tiny")(models.models_make_tiny)
models_app.command("download")(models.models_download)
models_app.command("list")(models.models_list)
models_app.command("verify")(models.models_verify)
loras_app.command("list")(loras.loras_list)
loras_app.command("download")(loras.loras_download)
app.command("plan")(plan.plan_command)
app.command("run")(roles.run_command)
app.command("serve")(roles.serve_command)
app.command("worker")(roles.worker_command)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        errors.print(str(exc), markup=False)
        sys.exit(2)
    except OSError as exc:
        # A path that is a file, a folder this user may not write, a full disk: the user's to fix, never a traceback.
        where = f" {exc.filename}" if exc.filename else ""
        errors.print(
            f"Could not use{where}: {exc.strerror or exc}. Check the path and its permissions, or choose another.",
            markup=False,
        )
        sys.exit(2)
