"""The long-running processes: `wanbot run`, `serve` and `worker` (runtime.py) with their supervised tasks, and one
worker process per device (worker_processes.py).

May import: bot.chat, bot.telegram, bot.discord, engine.service and the engine's records.
"""
