"""Tests of bot/chat: the chat core, texts, relay, transfers and the chats' inbox."""
