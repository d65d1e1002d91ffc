"""The Hugging Face cache layout: where huggingface_hub keeps models, how to tell a complete snapshot from a partial
one, how to check its files (and those of wanbot's old layout), and how a file is put in place. wanbot reads the
standard cache (as `huggingface-cli download` or any diffusers script fills it) and writes its own downloads in the
same layout (engine/hub/downloads.py, which fetches them).

Layout: `<cache>/models--owner--name/refs/<revision>` holding a commit, `snapshots/<commit>/<path>` a relative link
to `blobs/<etag>`, the etag being the sha256 of an LFS file or the git blob id of a small one. A snapshot may be
partial (a download limited to some files, or stopped): a link whose blob is missing does not exist, so every file
needed is checked, never just the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
SKIPPED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".mp4", ".webp", ".gitattributes")
SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_OID = re.compile(r"[0-9a-f]{40}")
HASH_CHUNK = 1024 * 1024
MANIFEST = ".wanbot-manifest.json"  # how downloads in the old layout recorded their files


def hub_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the standard Hugging Face cache is, by huggingface_hub's own rules (constants.py: HF_HUB_CACHE, the
    older HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub). Read when asked, not at import as
    huggingface_hub does, so a variable set after start (a test, a supervisor) is honoured too."""
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(cache)))


def repo_folder(cache: Path, repo_id: str) -> Path:
    """huggingface_hub's repo_folder_name, less its check of the id: a name that is no repo id (a local folder a mode
    names) is simply found nowhere, as before, instead of raising."""
    return cache / f"models--{repo_id.replace('/', '--')}"


def files_snapshot(cache: Path, repo_id: str, files: list[str], revision: str = "main") -> Path | None:
    """A snapshot of `repo_id` holding every one of `files` (a LoRA pair, say), or None."""
    return next((found for found in _snapshots(cache, repo_id, revision) if _all_files(found, files)), None)


def pipeline_snapshot(cache: Path, repo_id: str, revision: str = "main") -> Path | None:
    """A snapshot of a diffusers pipeline with every file the pipeline loads, or None."""
    return next((found for found in _snapshots(cache, repo_id, revision) if pipeline_problems(found) == []), None)


def _snapshots(cache: Path, repo_id: str, revision: str) -> list[Path]:
    """The snapshots to try, best first: the one `revision` names (a branch or tag through refs/, or a commit), then
    the others, newest first. A model pinned to a commit or tag by `--revision` has no refs/main, and a stopped
    download of a newer commit may have moved refs/main ahead of the last complete one: wanbot, which never updates
    a model by itself, uses what is complete, as its own store always did."""
    snapshots = repo_folder(cache, repo_id) / "snapshots"
    ref = repo_folder(cache, repo_id) / "refs" / revision
    named = snapshots / (ref.read_text().strip() if ref.is_file() else revision)
    others = sorted(snapshots.glob("*"), key=lambda folder: folder.stat().st_mtime, reverse=True)
    return [folder for folder in dict.fromkeys([named, *others]) if folder.is_dir()]


def _all_files(snapshot: Path, files: list[str]) -> bool:
    return bool(files) and all((snapshot / name).is_file() for name in files)


def cached_pipeline(repo_id: str, environ: Mapping[str, str] = os.environ) -> Path | None:
    """`pipeline_snapshot` in the standard cache."""
    return pipeline_snapshot(hub_cache(environ), repo_id)


def pipeline_problems(snapshot: Path) -> list[str]:
    """What keeps a pipeline snapshot from loading: a component model_index.json names with no files, a model
    without weights, a shard its index names missing, or a needed file whose blob is missing. Fast: nothing is
    hashed. Extra files the pipeline never loads (a half-precision copy, a model card) do not count, so a snapshot
    wanbot has just completed always passes."""
    index = _read_json(snapshot / "model_index.json")
    if not isinstance(index, dict):
        return ["model_index.json is missing or unreadable"]
    components = [name for name, value in index.items() if isinstance(value, list) and value and value[0]]
    problems = [f"{name}/ is incomplete" for name in components if not _component_complete(snapshot / name)]
    paths = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if not path.is_dir()]
    problems += [f"{path} is missing" for path in select_files(index, paths) if not (snapshot / path).is_file()]
    return problems


def _component_complete(folder: Path) -> bool:
    """A component with its files present: every shard an index names, or at least one weight file for a model;
    a scheduler or tokenizer needs only its files to exist (links with their blobs)."""
    if not folder.is_dir():
        return False
    present = [path for path in folder.iterdir() if path.is_file()]
    if not present:
        return False
    for index_path in folder.glob("*.index.json"):
        index = _read_json(index_path)
        shards = set(index.get("weight_map", {}).values()) if isinstance(index, dict) else None
        if shards is None or not all((folder / shard).is_file() for shard in shards):
            return False
    has_config_of_a_model = (folder / "config.json").is_file()
    return not has_config_of_a_model or any(path.name.endswith(WEIGHT_SUFFIXES) for path in present)


def _read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or cut short (a copy that stopped): such a snapshot is incomplete,
    not a reason to fail."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def blob_problems(snapshot: Path) -> list[str]:
    """Each file of the snapshot checked against the hash its blob is named by (sha256 or git blob id): the check
    `wanbot models verify` makes on any snapshot in this layout, whoever downloaded it."""
    problems = []
    for path in sorted(snapshot.rglob("*")):
        if not path.is_file():
            continue  # a folder, or a link without its blob: pipeline_problems says so when the pipeline needs it
        name = path.relative_to(snapshot).as_posix()
        # The first hop names the blob; it may itself lead on into huggingface_hub's shared store.
        blob = os.readlink(path).rsplit("/", 1)[-1] if path.is_symlink() else ""
        if SHA256.fullmatch(blob) and file_sha256(path) != blob:
            problems.append(f"{name} does not match its sha256")
        elif GIT_OID.fullmatch(blob) and git_blob_id(path) != blob:
            problems.append(f"{name} does not match its git blob id")
    return problems


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_id(path: Path) -> str:
    """The id git (and the Hub's ETag) gives a small file: sha1 of "blob <size>\\0" and the content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def select_files(model_index: dict[str, Any], paths: list[str]) -> list[str]:
    """The files a diffusers pipeline loads: model_index.json and its components' folders; one weight format
    (safetensors when there is any), no half-precision variants beside full ones, no docs or example media."""
    components = {
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    }
    chosen = ["model_index.json"] if "model_index.json" in paths else []
    for component in sorted(components):
        inside = [path for path in paths if path.startswith(f"{component}/")]
        has_safetensors = any(path.endswith(".safetensors") for path in inside)
        for path in inside:
            name = path.rsplit("/", 1)[-1]
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                if has_safetensors and "safetensors" not in name:
                    continue
                variant = _variant_of(name)
                if variant and path.replace(f"{variant}.", ".", 1) in inside:
                    continue  # an fp16/bf16 copy beside the default weights
            chosen.append(path)
    return chosen


def _variant_of(name: str) -> str:
    parts = name.split(".")
    return f".{parts[-2]}" if len(parts) >= 3 and parts[-2] in ("fp16", "bf16", "fp32") else ""


def verify_snapshot(folder: Path) -> list[str]:
    """Check a snapshot's files (a long read: every byte is hashed); return the problems found (none: it is intact).
    In the Hugging Face layout each file is checked against the hash its blob is named by, whoever downloaded it;
    a download in the old layout against its manifest."""
    if folder.parent.name == "snapshots":
        return pipeline_problems(folder) + blob_problems(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return [f"{folder} has no download manifest; download it again with `wanbot models download`."]
    problems = []
    for entry in json.loads(manifest_path.read_text())["files"]:
        path = folder / entry["path"]
        if not path.exists():
            problems.append(f"{entry['path']} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{entry['path']} is {path.stat().st_size} bytes, expected {entry['size']}")
        elif entry["sha256"] and file_sha256(path) != entry["sha256"]:
            problems.append(f"{entry['path']} does not match its sha256")
    return problems


def link_snapshot_file(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<path> as a relative link to its blob, as huggingface_hub makes it, so the cache folder
    can move as a whole. A link is made in one step: no reader sees half of one."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)  # a link whose blob went missing, or one from a copy with another content
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except FileExistsError:
        if pointer.resolve() != blob.resolve():  # huggingface_hub made the same link meanwhile: that is fine
            raise


def link_or_copy(source: Path, target: Path) -> None:
    """`source`'s content at `target`: a hard link where both are on one disk, else a copy; under a temporary name
    first, so `target` is whole or absent."""
    temporary = target.with_name(f"{target.name}.{os.getpid()}.linking")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)
