"""What the prompt enhancer adds to a request, in seconds, on this machine.

1. The local path (prompts.enhancer = "local"): the model loaded once (built first, for the tiny stand-in), then the
   median of N rewrites of a short prompt, greedy, up to --tokens new tokens. The tiny model (hidden size 32, two
   layers) measures wanbot's own overhead around `generate`: the thread hop, the chat template, decoding, the guard;
   a real instruct model adds its own generation time (--repo names one on disk or on the Hub).
2. The openai path (prompts.enhancer = "openai"): the round trip to a fake OpenAI-compatible endpoint on 127.0.0.1
   (tests/enhance/fake_openai.py) that answers at once: the first request (a new connection), then the median of N on
   the kept one. A real server adds its generation time on top.

    .venv/bin/python -m bench.enhancer [--requests 20] [--tokens 200] [--repo tiny]   # from the repository root
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from engine.config import DownloadsConfig, PromptsConfig
from engine.enhance.enhancer import Enhanced, Enhancer
from engine.hub.downloads import Downloader
from tests.enhance.fake_openai import FakeOpenAI

PROMPT = "a ginger cat walks through the rain at night"


async def seconds(work: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def rewrites(enhancer: Enhancer, count: int) -> tuple[list[float], Enhanced]:
    times = [await seconds(lambda: enhancer.enhance(PROMPT, "t2v")) for _ in range(count)]
    return times, await enhancer.enhance(PROMPT, "t2v")


def figures(times: list[float]) -> str:
    ordered = sorted(times)
    return f"median {statistics.median(ordered) * 1000:.1f} ms, p90 {ordered[int(len(ordered) * 0.9)] * 1000:.1f} ms"


async def local(args: argparse.Namespace, downloader: Downloader) -> None:
    config = PromptsConfig(enhancer="local", enhancer_repo=args.repo, enhancer_max_new_tokens=args.tokens)
    enhancer = Enhancer(config, downloader)
    print(enhancer.describe())
    print(f"- load (built, then read): {await seconds(enhancer.load):.2f} s, once")
    times, sample = await rewrites(enhancer, args.requests)
    print(f"- per request, {args.requests} rewrites: {figures(times)}")
    print(f"- rewrite: {len(sample.prompt)} characters, enhanced={sample.enhanced}, note={sample.note}")
    await enhancer.close()


async def openai(args: argparse.Namespace, downloader: Downloader) -> None:
    server = FakeOpenAI()
    await server.start()
    try:
        enhancer = Enhancer(PromptsConfig(enhancer="openai", enhancer_url=server.url), downloader)
        print(enhancer.describe())
        first = await seconds(lambda: enhancer.enhance(PROMPT, "t2v"))
        print(f"- first request (new connection): {first * 1000:.1f} ms")
        times, sample = await rewrites(enhancer, args.requests)
        print(f"- per request, {args.requests} on the kept connection: {figures(times)}")
        print(f"- rewrite: {len(sample.prompt)} characters, enhanced={sample.enhanced}, note={sample.note}")
        await enhancer.close()
    finally:
        await server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200, help="prompts.enhancer_max_new_tokens of the local model")
    parser.add_argument("--repo", default="tiny", help="the local model: 'tiny', a folder or a Hub repo id")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        downloader = Downloader(Path(folder) / "models", DownloadsConfig())
        await local(args, downloader)
        await openai(args, downloader)


if __name__ == "__main__":
    asyncio.run(main())
