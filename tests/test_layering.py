"""The architecture, checked on the import graph of engine/ and bot/ (every import, at any depth, TYPE_CHECKING too):
bot/ -> engine/service.py and engine/operator.py (the facade) -> the rest of engine/, nothing the other way, no
import circles, and each package importing only what its docstring allows. A module of bot/ may take typed records
(and the engine's wording helpers and settings loader) from elsewhere in engine/, never its machinery: what a remote
worker will sit behind is the facade alone."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from engine.service import Engine

ROOT = Path(__file__).resolve().parent.parent
# The facade: the engine of a running process, and the operator's tools the CLI uses with no engine running.
FACADE = {"engine.service", "engine.operator"}
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
# What a package (and every module in it) must never import directly: the packages' docstrings say why.
FACADE_AND_WORKER = ["engine.service", "engine.operator", "engine.worker"]
FORBIDDEN = {
    "engine": ["bot"],
    "engine.queue": [
        "engine.pipeline",
        "engine.hub",
        "engine.service",
        "engine.operator",
        "engine.worker",
        "engine.metrics",
    ],
    "engine.storage": ["engine.pipeline", "engine.hub", *FACADE_AND_WORKER],
    "engine.pipeline": ["engine.queue", *FACADE_AND_WORKER, "engine.metrics"],
    "engine.hub": FACADE_AND_WORKER,
    "engine.enhance": ["engine.queue", "engine.pipeline", *FACADE_AND_WORKER, "engine.metrics"],
    "engine.safety": ["engine.queue", "engine.pipeline", *FACADE_AND_WORKER, "engine.metrics"],
    "bot.chat": ["bot.telegram", "bot.discord", "bot.roles", "bot.cli", "telegram", "discord"],
    "bot.telegram": ["bot.discord", "bot.roles", "bot.cli", "discord"],
    "bot.discord": ["bot.telegram", "bot.roles", "bot.cli", "telegram"],
    "bot.roles": ["bot.cli"],
}
ENGINE_MACHINERY = {"_queue", "_store", "_runner", "_worker", "_files", "_prompt_lengths", "_rules"}


@dataclasses.dataclass(frozen=True)
class Imported:
    module: str  # the module imported (for `from x import y`, x.y when that is a module of ours, else x)
    names: tuple[str, ...]  # what `from x import` takes; empty for `import x`


@cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "bot").rglob("*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


@cache
def imports_of(module: str) -> tuple[Imported, ...]:
    found = []
    for node in ast.walk(ast.parse(modules()[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append(
                    Imported(submodule, ()) if submodule in modules() else Imported(node.module, (alias.name,))
                )
        elif isinstance(node, ast.Import):
            found.extend(Imported(alias.name, ()) for alias in node.names)
    return tuple(found)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def ours(module: str) -> list[str]:
    return sorted({imported.module for imported in imports_of(module) if imported.module in modules()})


BOT_MODULES = [name for name in modules() if within(name, "bot")]


@pytest.mark.parametrize("module", BOT_MODULES)
def test_the_bot_reaches_the_engine_only_through_its_facade(module: str):
    for imported in imports_of(module):
        if not within(imported.module, "engine") or imported.module in FACADE:
            continue
        assert imported.module in RECORD_MODULES, f"{module} imports {imported.module}: go through the facade"
        for name in imported.names:
            value = getattr(importlib.import_module(imported.module), name)
            machinery = inspect.isfunction(value) and imported.module not in FUNCTIONS_ALLOWED
            assert not machinery, f"{module} calls {imported.module}.{name}: give the facade a method for it"
    reached = [
        node.attr
        for node in ast.walk(ast.parse(modules()[module].read_text()))
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_MACHINERY and _names_an_engine(node.value)
    ]
    assert not reached, f"{module} reaches past the facade: {reached}"


def _names_an_engine(node: ast.expr) -> bool:
    """`engine`, `self._engine`, `bot.engine`: what holds an Engine is named for it throughout bot/."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lstrip("_").endswith("engine")


def test_the_facade_shows_no_machinery():
    public = {field.name for field in dataclasses.fields(Engine) if not field.name.startswith("_")}
    assert public == {"settings", "supervisor"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_package_imports_only_what_it_may(package: str):
    for module in (name for name in modules() if within(name, package)):
        for imported in imports_of(module):
            wrong = [rule for rule in FORBIDDEN[package] if within(imported.module, rule)]
            assert not wrong, f"{module} imports {imported.module}, which {package} must not"


def test_no_module_imports_itself_round_a_circle():
    graph = {module: ours(module) for module in modules()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in graph[module]:
            if state.get(imported) == "open":
                circle = [*path[path.index(imported) :], imported]
                pytest.fail(f"import circle: {' -> '.join(circle)}")
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_chat_side_and_the_cli_start_without_torch():
    """Only opening an engine loads the model side: the chat modules, the facade and the CLI's queue and model
    commands start without torch (a serving process needs none of it)."""
    names = ["bot.cli", "bot.chat.core", "bot.chat.relay", "bot.roles.runtime", "bot.telegram.adapter"]
    names.append("bot.discord.adapter")
    check = f"import sys; import {', '.join(names)}; print(sorted({{'torch', 'diffusers'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


SERVE_READS_A_PREVIEW = """
import asyncio, sys
from pathlib import Path
from engine.config import Settings
from engine.service import Engine

async def main():
    settings = Settings(data_dir=Path(sys.argv[1]), previews={"enabled": True})
    engine = await Engine.open(settings, with_worker=False)
    try:
        settings.previews_dir.mkdir(parents=True, exist_ok=True)
        (settings.previews_dir / "job-7.jpg").write_bytes(b"jpeg")
        assert await engine.preview_bytes(7) == b"jpeg"
    finally:
        await engine.close()
    print(sorted({"torch", "diffusers"} & set(sys.modules)))

asyncio.run(main())
"""


def test_a_serving_engine_reads_live_previews_without_torch(tmp_path: Path):
    """`wanbot serve` shows previews that workers made: reading one must not load torch into it."""
    done = subprocess.run(
        [sys.executable, "-c", SERVE_READS_A_PREVIEW, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={key: value for key, value in os.environ.items() if not key.startswith("WANBOT_")},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
