"""Discord through discord.py: the adapter (adapter.py) translates slash commands, buttons and the apps menu into
chat-core calls and engine events into messages; inbox.py stores a deferred request before it is acknowledged;
seams.py is the one place that touches discord.py's private API.

May import: bot.chat, engine.service and the engine's records.
"""
