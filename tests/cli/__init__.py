"""Tests of bot/cli: the `wanbot` commands."""
