"""Tests of bot/discord: the real discord.py against a fake Discord on loopback, and the private-API seams."""
