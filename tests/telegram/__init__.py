"""Tests of bot/telegram: the real python-telegram-bot against a fake Bot API on loopback."""
