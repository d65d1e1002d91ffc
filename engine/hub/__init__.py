"""Getting models from the Hugging Face Hub: wanbot's own downloader (downloads.py: only the files needed, resumable,
disk checked first, retried with backoff), the worker's side of it with progress in chat (fetcher.py), and the
shared Hugging Face cache (hfcache.py).

May import: engine.config, engine.errors, engine.jobs, engine.storage, engine.pipeline.models. Never bot.
"""
