"""The enhancer as a small instruct model in this process (prompts.enhancer = "local").

The model is loaded once, on first use or at start (`load`), and kept; it runs on a thread, one rewrite at a time, so
the event loop goes on answering chats while it writes. Decoding is greedy: the same prompt gets the same rewrite.
A Hub model is fetched through wanbot's Downloader (resumable, disk checked, into the Hugging Face cache) and only
the files a causal LM needs to load: its config, its tokenizer and its weights, in one file or in shards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.config import PromptsConfig
from engine.enhance.failures import NOT_IN_TIME, UNAVAILABLE, EnhancerFailed
from engine.enhance.tiny import make_tiny_enhancer
from engine.errors import UserError
from engine.hub.downloads import Downloader

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_FOLDER = "tiny-enhancer"  # under the models folder, beside the tiny Wan models
MODEL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json"]
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded model's map of its weights to its shard files
CHAT_TEMPLATE = "chat_template.jinja"


class LocalModel:
    def __init__(self, config: PromptsConfig, downloader: Downloader) -> None:
        self._config = config
        self._downloader = downloader
        self._lock = asyncio.Lock()  # one load, and one rewrite at a time: they share the model and the CPU cores
        self._loaded: tuple[PreTrainedTokenizerBase, PreTrainedModel] | None = None

    def describe(self) -> str:
        config = self._config
        return (
            f"local {config.enhancer_repo} on {config.enhancer_device}, up to {config.enhancer_max_new_tokens} tokens"
        )

    async def load(self) -> None:
        """Fetch the model if need be and load it; EnhancerFailed if either cannot be done. Loaded once."""
        async with self._lock:
            await self._load()

    async def complete(self, system: str, user: str) -> str:
        async with self._lock:
            await self._load()
            return await asyncio.to_thread(self._generate, system, user)

    async def close(self) -> None:
        self._loaded = None

    async def _load(self) -> None:
        if self._loaded is not None:
            return
        repo = self._config.enhancer_repo
        try:
            folder = await self._folder(repo)
        except UserError as error:
            raise EnhancerFailed(f"the local model {repo} could not be fetched: {error}", UNAVAILABLE) from None
        try:
            self._loaded = await asyncio.to_thread(self._read, folder)
        except (OSError, ValueError) as error:
            raise EnhancerFailed(f"the local model in {folder} could not be loaded: {error}", UNAVAILABLE) from None
        log.info("prompt enhancer: %s loaded on %s", repo, self._loaded[1].device)

    async def _folder(self, repo: str) -> Path:
        if repo == TINY:
            return await asyncio.to_thread(make_tiny_enhancer, self._downloader.root / TINY_FOLDER)
        if folder := await asyncio.to_thread(_folder_named, repo):
            return folder
        return await self._hub_folder(repo)

    async def _hub_folder(self, repo: str) -> Path:
        files = [*MODEL_FILES, WEIGHTS]
        try:
            folder = await self._hub_files(repo, files)
        except UserError as single:
            # Larger models keep their weights in shards, which only the index names.
            try:
                files = [*MODEL_FILES, WEIGHTS_INDEX]
                folder = await self._hub_files(repo, files)
                files += await asyncio.to_thread(_shards, folder)
                folder = await self._hub_files(repo, files)
            except UserError as sharded:
                both = {str(single): None, str(sharded): None}  # a repo that is not there says so twice
                raise UserError(" / ".join(both)) from None
        if not await asyncio.to_thread(_has_chat_template, folder):
            # Tokenizers saved by newer transformers keep their chat template in a file of its own.
            folder = await self._hub_files(repo, [*files, CHAT_TEMPLATE])
        return folder

    async def _hub_files(self, repo: str, files: list[str]) -> Path:
        if found := self._downloader.local_files(repo, files):
            return found
        log.info("prompt enhancer: downloading %s (%s)", repo, ", ".join(files))
        return await self._downloader.download(repo, files=files)

    def _read(self, folder: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.chat_template is None:
            raise ValueError("its tokenizer has no chat template: it is not an instruct (chat) model")
        device = self._device()
        # bfloat16 halves a GPU's share; on a CPU float32 is the fast path (bfloat16 matmuls are slow on most).
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        return tokenizer, model

    def _device(self) -> torch.device:
        wanted = self._config.enhancer_device
        if wanted == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(wanted)

    def _generate(self, system: str, user: str) -> str:
        assert self._loaded is not None
        tokenizer, model = self._loaded
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        limit_s = self._config.enhancer_timeout_s
        started = time.monotonic()
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=self._config.enhancer_max_new_tokens,
                do_sample=False,
                max_time=limit_s,  # stops between two tokens; the thread cannot be interrupted otherwise
                pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        finished = len(new) > 0 and new[-1].item() in _end_tokens(tokenizer, model)
        if not finished and time.monotonic() - started >= limit_s:
            raise EnhancerFailed(f"the local model wrote for {limit_s:g} s without finishing", NOT_IN_TIME)
        return tokenizer.decode(new, skip_special_tokens=True)


def _folder_named(repo: str) -> Path | None:
    """`prompts.enhancer_repo` as a folder on this machine, if it names one."""
    folder = Path(repo).expanduser()
    return folder if folder.is_dir() else None


def _shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))


def _has_chat_template(folder: Path) -> bool:
    return "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())


def _end_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    """The tokens that end a turn: the tokenizer's, and the generation config's (Qwen's instruct models name two)."""
    configured = model.generation_config.eos_token_id
    ends = configured if isinstance(configured, list) else [configured]
    return {token for token in [*ends, tokenizer.eos_token_id] if token is not None}
