"""The layering the chat core stands on: bot/ -> engine/service.py -> the rest of engine/, nothing the other way. A
module of bot/ (the chat modules and the CLI) may take typed records (and the engine's wording helpers and settings
loader) from elsewhere in engine/, never its machinery: what a remote worker will sit behind is the facade alone."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD_MODULES = {
    "engine.config",
    "engine.errors",
    "engine.jobs",
    "engine.pipeline.models",
    "engine.storage.images",
    "engine.pipeline.presets",
}
# Besides records, the wording helpers of the engine's messages and the loading of the settings records.
FUNCTIONS_ALLOWED = {"engine.errors", "engine.config"}
BOT_MODULES = sorted(path for path in (ROOT / "bot").glob("*.py") if path.name != "__init__.py")


def engine_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every `from engine.x import name` in the file, at any depth."""
    tree = ast.parse(path.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine")
        for alias in node.names
    ]


@pytest.mark.parametrize("path", BOT_MODULES, ids=lambda path: path.name)
def test_the_bot_reaches_the_engine_only_through_its_facade(path: Path):
    for module_name, name in engine_imports(path):
        if module_name == "engine.service":
            continue
        assert module_name in RECORD_MODULES, f"{path.name} imports {name} from {module_name}"
        value = getattr(importlib.import_module(module_name), name)
        machinery = inspect.isfunction(value) and module_name not in FUNCTIONS_ALLOWED
        assert not machinery, f"{path.name} calls {module_name}.{name}: give the facade a method for it"
    source = path.read_text()
    for private in (
        "engine.queue.jobqueue.",
        "engine.worker.",
        "_engine.queue",
        "_engine.worker",
        "engine.runner",
        "engine.store",
    ):
        assert private not in source, f"{path.name} reaches past the facade: {private}"


def test_the_engine_never_imports_the_bot():
    for path in sorted((ROOT / "engine").glob("*.py")):
        modules = [
            node.module or "" for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
        ]
        modules += [
            alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import)
            for alias in node.names
        ]
        assert not [module for module in modules if module == "bot" or module.startswith("bot.")], path.name


def test_the_chat_side_and_the_cli_start_without_torch():
    """Only opening an engine loads the model side: the chat modules, the facade and the CLI's queue and model
    commands start without torch (a serving process needs none of it)."""
    modules = [
        "bot.cli",
        "bot.chat.core",
        "bot.chat.relay",
        "bot.roles.runtime",
        "bot.telegram.adapter",
        "bot.discord.adapter",
    ]
    check = f"import sys; import {', '.join(modules)}; print(sorted({{'torch', 'diffusers'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
