"""Telegram through python-telegram-bot: the adapter (adapter.py) translates updates into chat-core calls and engine
events into messages; polling.py stores each update before Telegram learns it arrived.

May import: bot.chat, engine.service and the engine's records.
"""
